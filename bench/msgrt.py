"""Back-end CPU per request, virtio-msg against vhost-user, without a guest.

The same 4 KiB QD1 reads of a page-cache file through both transports of edgevirt's
back-end: the virtio-msg back-end process (ivshmem server, real message memory and
doorbells; driven by the package's MsgDriver) and ``edgevirt backend run`` over vhost-user
(driven by bench/blk.drive). The drivers differ, so only the back-ends' own CPU per request
(``/proc/PID/stat``, all threads) compares; rounds alternate, medians.
"""

from __future__ import annotations

import os
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.blk import cpu_seconds, drive, edgevirt, wait_socket
from edgevirt.backend.transport.virtio_msg.driver import MsgDriver
from edgevirt.backend.transport.virtio_msg.service import map_carveout
from edgevirt.backend.virtq.driver import DriverQueue

BASE = 0x5C00_0000
CARVE = 4 << 20
DISK = 32 << 20
F_EVENT_IDX = 29


def msg_round(sock: Path, carve: Path, pid: int, n: int) -> float:
    """n QD1 reads over virtio-msg; the back-end's CPU per request in us."""
    mem = map_carveout(carve, BASE)
    try:
        with MsgDriver(str(sock), mem) as drv:
            drv.negotiate(0, drv.features(0) & ~(1 << F_EVENT_IDX))
            q = DriverQueue(mem, 16, base=BASE)
            drv.setup_queue(0, 0, q)
            drv.driver_ok(0)
            c0 = cpu_seconds(pid)
            for i in range(n):
                q.reset_data()
                q.add([struct.pack("<IIQ", 0, 0, 8 * (i % 4000))], [4096, 1])
                drv.kick(0, 0)
                drv.wait_used(0, 0)
                q.get_used()
            return (cpu_seconds(pid) - c0) / n * 1e6
    finally:
        mem.close()


def run(rounds: int = 5, n: int = 3000) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="edgevirt-bench-") as tmp:
        d = Path(tmp)
        disk, carve, sock = d / "disk.img", d / "carve", d / "msg.sock"
        disk.write_bytes(os.urandom(DISK))
        carve.write_bytes(bytes(CARVE))
        msg = subprocess.Popen(
            [sys.executable, "-m", "edgevirt.backend.transport.virtio_msg", "--socket",
             str(sock), "--carveout-file", str(carve), "--carveout-base", hex(BASE),
             "--log-level", "warning", "--device", f"blk:path={disk}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        vu, vu_sock = edgevirt("")(disk, d)
        res: dict[str, list[float]] = {"msg": [], "vu": []}
        try:
            deadline = time.monotonic() + 20
            while not sock.exists():
                if msg.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the virtio-msg back-end did not start")
                time.sleep(0.02)
            wait_socket(vu_sock, vu)
            for _ in range(rounds):
                res["msg"].append(msg_round(sock, carve, msg.pid, n))
                c0 = cpu_seconds(vu.pid)
                drive(vu_sock, 1, 4096, False, n, disk=DISK)
                res["vu"].append((cpu_seconds(vu.pid) - c0) / n * 1e6)
        finally:
            for p in (msg, vu):
                os.killpg(p.pid, signal.SIGTERM)
            for p in (msg, vu):
                p.wait(10)
    m, v = statistics.median(res["msg"]), statistics.median(res["vu"])
    return [{
        "bench": "4 KiB read QD1, page cache, back-end CPU per request",
        "virtio-msg us/req": round(m, 1), "vhost-user us/req": round(v, 1),
        "msg/vhost-user": round(m / v, 2),
        "per round msg": ", ".join(f"{x:.0f}" for x in res["msg"]),
        "per round vu": ", ".join(f"{x:.0f}" for x in res["vu"]),
    }]  # fmt: skip
