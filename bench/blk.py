"""vhost-user-blk back-ends driven by the synthetic front-end (no guest): edgevirt vs
qemu-storage-daemon on the same file, same front-end, same run.

The front-end is Python (edgevirt's VhostUserFrontend + DriverQueue): its own cost is in
every number, for both back-ends alike, so the ratio understates a faster back-end.
"""

from __future__ import annotations

import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgevirt.backend.devices import blk as b
from edgevirt.backend.transport.vhost_user.frontend import VhostUserFrontend
from edgevirt.backend.virtq.pyring import DESC_F_NEXT as NEXT
from edgevirt.backend.virtq.pyring import DESC_F_WRITE as WRITE

DISK = 256 << 20
QSIZE = 256


def start_edgevirt(disk: Path, d: Path, fastpath: bool = True) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, EDGEVIRT_BLK_FASTPATH="1" if fastpath else "0")
    sock_dir = d / ("ev" if fastpath else "ev-py")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgevirt", "backend", "run", "--log-level", "warning",
         "--device", f"blk:path={disk}", "--socket-dir", str(sock_dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env,
    )  # fmt: skip
    return proc, str(sock_dir / "0-blk.sock")


def start_edgevirt_python(disk: Path, d: Path) -> tuple[subprocess.Popen, str]:
    return start_edgevirt(disk, d, fastpath=False)


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


H = struct.Struct("<H")
Q = struct.Struct("<Q")
I32 = struct.Struct("<I")


class _Ring:
    """One queue of the synthetic driver: slot k owns descriptors 3k..3k+2."""

    def __init__(self, fe: VhostUserFrontend, index: int, base: int, qd: int, block: int,
                 write: bool, qsize: int) -> None:  # fmt: skip
        vr = fe.setup_vring(index, qsize, base=base)
        drv = vr.driver
        gpa0 = drv.mem.regions[0].gpa
        self.avail, self.used = drv.avail - gpa0, drv.used - gpa0
        self.kick, self.call, self.mask = vr.kick, vr.call, qsize - 1
        self.sector_at: list[int] = []
        self.status_at: list[int] = []
        for k in range(qd):
            hdr, data, status = drv.alloc(16), drv.alloc(block, align=4096), drv.alloc(1)
            drv.write_desc(3 * k, hdr, 16, NEXT, 3 * k + 1)
            drv.write_desc(3 * k + 1, data, block, NEXT | (0 if write else WRITE), 3 * k + 2)
            drv.write_desc(3 * k + 2, status, 1, WRITE, 0)
            drv.write(hdr, b.REQ_HEADER.pack(b.T_OUT if write else b.T_IN, 0, 0))
            if write:
                drv.write(data, os.urandom(block))
            self.sector_at.append(hdr - gpa0 + 8)
            self.status_at.append(status - gpa0)
        self.free = list(range(qd))
        self.started = [0.0] * qd
        self.avail_idx = self.used_seen = 0


def drive(
    sock: str,
    qd: int,
    block: int,
    sequential: bool,
    total: int,
    *,
    write: bool = False,
    qsize: int = QSIZE,
    disk: int = DISK,
    queues: int = 1,
) -> dict:
    """Keep ``qd`` reads (or writes) in flight on each of ``queues`` queues; return IOPS,
    MB/s and latency percentiles.

    The front-end is kept cheap so the back-end dominates: slot k owns descriptors
    3k..3k+2 (header, data, status), written once; per request only the header's sector and
    one avail ring entry are stored, straight into the shared mapping. Every status byte is
    checked.
    """
    if 3 * qd > qsize:
        raise ValueError(f"QD{qd} needs {3 * qd} descriptors, the ring has {qsize}")
    size = max(64 << 20, queues * (2 * qd * block + (8 << 20)))
    fe = VhostUserFrontend(sock, size=size, timeout=10)
    try:
        fe.negotiate()
        fe.set_mem_table()
        region = fe.mem.regions[0]
        buf = region.buf
        rings = [_Ring(fe, i, region.gpa + i * (size // queues), qd, block, write, qsize)
                 for i in range(queues)]  # fmt: skip
        by_call = {r.call: r for r in rings}
        rnd = random.Random(1)
        sectors = disk // 512 - block // 512
        pos = issued = 0
        lat: list[float] = []
        t0, c0 = time.perf_counter(), time.process_time()
        while len(lat) < total:
            for r in rings:
                if not r.free or issued >= total:
                    continue
                while r.free and issued < total:
                    k = r.free.pop()
                    if sequential:
                        sector, pos = pos, (pos + block // 512) % sectors
                    else:
                        sector = rnd.randrange(0, sectors // 8) * 8
                    Q.pack_into(buf, r.sector_at[k], sector)
                    H.pack_into(buf, r.avail + 4 + 2 * (r.avail_idx & r.mask), 3 * k)
                    r.avail_idx = (r.avail_idx + 1) & 0xFFFF
                    r.started[k] = time.perf_counter()
                    issued += 1
                H.pack_into(buf, r.avail + 2, r.avail_idx)  # x86: stores are not reordered
                os.eventfd_write(r.kick, 1)
            ready = select.select(list(by_call), [], [], 10)[0]
            if not ready:
                raise RuntimeError("back-end did not signal a used buffer within 10 s")
            now = time.perf_counter()
            for fd in ready:
                r = by_call[fd]
                os.eventfd_read(fd)
                used_idx = H.unpack_from(buf, r.used + 2)[0]
                while r.used_seen != used_idx:
                    k = I32.unpack_from(buf, r.used + 4 + 8 * (r.used_seen & r.mask))[0] // 3
                    if buf[r.status_at[k]] != b.S_OK:
                        raise RuntimeError(f"request of slot {k} failed: status "
                                           f"{buf[r.status_at[k]]}")  # fmt: skip
                    lat.append(now - r.started[k])
                    r.free.append(k)
                    r.used_seen = (r.used_seen + 1) & 0xFFFF
        elapsed = time.perf_counter() - t0
        fe_cpu = (time.process_time() - c0) / elapsed
    finally:
        fe.close()
    lat.sort()
    return {
        "fe cpu": fe_cpu,  # share of one core the front-end itself used: near 1 = its limit
        "iops": total / elapsed,
        "MB/s": total * block / elapsed / 1e6,
        "p50 us": lat[len(lat) // 2] * 1e6,
        "p99 us": lat[int(len(lat) * 0.99)] * 1e6,
    }


WORKLOADS = [
    ("4 KiB random read QD1", 1, 4096, False, 10000),
    ("4 KiB random read QD32", 32, 4096, False, 50000),
    ("64 KiB sequential read QD32", 32, 65536, True, 10000),
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
        backends = (("qemu-storage-daemon", start_qsd), ("edgevirt", start_edgevirt),
                    ("edgevirt-python", start_edgevirt_python))  # fmt: skip
        for name, start in backends:
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
            q, e, py = per["qemu-storage-daemon"], per["edgevirt"], per["edgevirt-python"]
            rows.append({
                "bench": wl,
                "qsd IOPS": round(q["iops"]), "edgevirt IOPS": round(e["iops"]),
                "edgevirt (Python path) IOPS": round(py["iops"]),
                "qsd MB/s": round(q["MB/s"], 1), "edgevirt MB/s": round(e["MB/s"], 1),
                "qsd p50/p99 us": f"{q['p50 us']:.0f}/{q['p99 us']:.0f}",
                "edgevirt p50/p99 us": f"{e['p50 us']:.0f}/{e['p99 us']:.0f}",
                "edgevirt/qsd": round(e["iops"] / q["iops"], 2),
                "Python path/qsd": round(py["iops"] / q["iops"], 2),
            })  # fmt: skip
    return rows
