"""vhost-user-blk back-ends driven by the synthetic front-end (no guest): edgevirt vs
qemu-storage-daemon on the same file, same front-end, same run.

The front-end is Python (edgevirt's VhostUserFrontend + DriverQueue): its own cost is in
every number, for both back-ends alike, so the ratio understates a faster back-end.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgevirt.backend.devices import blk as b
from edgevirt.backend.transport.vhost_user.frontend import VhostUserFrontend

DISK = 256 << 20
QSIZE = 256


def start_edgevirt(disk: Path, d: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgevirt", "backend", "run", "--log-level", "warning",
         "--device", f"blk:path={disk}", "--socket-dir", str(d / "ev")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    return proc, str(d / "ev" / "0-blk.sock")


def start_qsd(disk: Path, d: Path) -> tuple[subprocess.Popen, str]:
    sock = str(d / "qsd.sock")
    proc = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,node-name=f,filename={disk},cache.direct=off",
         "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},"
         "writable=on,num-queues=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    return proc, sock


def wait_socket(path: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"back-end did not create {path}")
        time.sleep(0.02)


def drive(sock: str, qd: int, block: int, sequential: bool, total: int) -> dict:
    fe = VhostUserFrontend(sock, size=64 << 20, timeout=10)
    try:
        fe.negotiate()
        fe.set_mem_table()
        vr = fe.setup_vring(0, QSIZE)
        drv = vr.driver
        rnd = random.Random(1)
        sectors = DISK // 512 - block // 512
        pos = 0
        # One buffer set per slot, reused: no allocation in the timed loop.
        slots = []
        for _ in range(qd):
            hdr = drv.alloc(16)
            data = drv.alloc(block, align=4096)
            status = drv.alloc(1)
            slots.append((hdr, data, status))
        free = list(range(qd))
        started: dict[int, tuple[int, float]] = {}
        lat: list[float] = []
        t0 = time.perf_counter()
        issued = 0
        while len(lat) < total:
            while free and issued < total:
                k = free.pop()
                hdr, data, status = slots[k]
                if sequential:
                    sector, pos = pos, (pos + block // 512) % sectors
                else:
                    sector = rnd.randrange(0, sectors // 8) * 8
                drv.write(hdr, b.REQ_HEADER.pack(b.T_IN, 0, sector))
                ids = [drv._free.pop(0) for _ in range(3)]
                drv.write_desc(ids[0], hdr, 16, 1, ids[1])
                drv.write_desc(ids[1], data, block, 3, ids[2])
                drv.write_desc(ids[2], status, 1, 2, 0)
                drv._chains[ids[0]] = ids
                drv.make_available(ids[0], publish=False)
                started[ids[0]] = (k, time.perf_counter())
                issued += 1
            drv.publish()
            fe.kick(0)
            fe.wait_call(0, 10)
            now = time.perf_counter()
            for head, _n in drv.get_used():
                k, t = started.pop(head)
                lat.append(now - t)
                free.append(k)
        elapsed = time.perf_counter() - t0
    finally:
        fe.close()
    lat.sort()
    return {
        "iops": total / elapsed,
        "MB/s": total * block / elapsed / 1e6,
        "p50 us": lat[len(lat) // 2] * 1e6,
        "p99 us": lat[int(len(lat) * 0.99)] * 1e6,
    }


WORKLOADS = [
    ("4 KiB random read QD1", 1, 4096, False, 4000),
    ("4 KiB random read QD32", 32, 4096, False, 20000),
    ("64 KiB sequential read QD32", 32, 65536, True, 4000),
]


def run() -> list[dict]:
    if not shutil.which("qemu-storage-daemon"):
        raise RuntimeError("qemu-storage-daemon not found (apt-get install qemu-system-common)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgevirt-bench-") as tmp:
        d = Path(tmp)
        disk = d / "disk.img"
        with open(disk, "wb") as f:
            for _ in range(DISK // (1 << 20)):
                f.write(os.urandom(1 << 20))  # allocated, in the page cache: warm
        results: dict[str, dict[str, dict]] = {}
        for name, start in (("qemu-storage-daemon", start_qsd), ("edgevirt", start_edgevirt)):
            proc, sock = start(disk, d)
            try:
                wait_socket(sock, proc)
                for wl, qd, block, seq, total in WORKLOADS:
                    drive(sock, qd, block, seq, min(total, 500))  # warm-up
                    results.setdefault(wl, {})[name] = drive(sock, qd, block, seq, total)
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(10)
        for wl, per in results.items():
            q, e = per["qemu-storage-daemon"], per["edgevirt"]
            rows.append({
                "bench": wl,
                "qsd IOPS": round(q["iops"]), "edgevirt IOPS": round(e["iops"]),
                "qsd MB/s": round(q["MB/s"], 1), "edgevirt MB/s": round(e["MB/s"], 1),
                "qsd p50/p99 us": f"{q['p50 us']:.0f}/{q['p99 us']:.0f}",
                "edgevirt p50/p99 us": f"{e['p50 us']:.0f}/{e['p99 us']:.0f}",
                "edgevirt/qsd": round(e["iops"] / q["iops"], 2),
            })  # fmt: skip
    return rows
