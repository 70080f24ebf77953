"""Back-end CPU per request, virtio-msg against vhost-user, without a guest.

Also the virtio-msg data path alone, in one process and without system calls: an
EVENT_AVAIL and a 4 KiB read chain placed in the rings, ``MsgBus.poll()`` timed (the driver's
side of each request is outside the timing).

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
from edgevirt.backend.devices import BlockDevice
from edgevirt.backend.loop import Loop
from edgevirt.backend.transport.virtio_msg import protocol as p
from edgevirt.backend.transport.virtio_msg.bus import MsgBus
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


def poll_us(d: Path, disk: Path, n: int = 20000) -> float:
    """In one process: microseconds of MsgBus.poll() per QD1 4 KiB read."""
    carve = d / "carve-inproc"
    carve.write_bytes(bytes(CARVE))
    mem, loop = map_carveout(carve, BASE), Loop()
    bus = MsgBus([BlockDevice(str(disk))], mem, loop, socket_path=str(d / "inproc.sock"))
    try:
        dev, drv = bus.devices[0], DriverQueue(mem, 16, base=BASE)
        dev.driver_features = 1 << 32  # VERSION_1
        dev.status = p.STATUS_FEATURES_OK | p.STATUS_DRIVER_OK
        vq = {"index": 0, "reserved0": 0, "size": 16, "reserved1": 0, "desc": drv.desc,
              "driver": drv.avail, "device": drv.used}  # fmt: skip
        dev.handle(p.request(p.MsgId.SET_VQUEUE, 0, 1, **vq))
        avail = p.encode(p.event(p.MsgId.EVENT_AVAIL, 0, index=0, next=0))
        spent = 0.0
        for i in range(n):
            drv.reset_data()
            drv.add([struct.pack("<IIQ", 0, 0, 8 * (i % 200))], [4096, 1])
            bus.msgmem.to_device.put(avail)
            t0 = time.perf_counter()
            bus.poll()
            spent += time.perf_counter() - t0
            if bus.msgmem.to_driver.get() is None or len(drv.get_used()) != 1:
                raise RuntimeError("the in-process request was not answered")
        return spent / n * 1e6
    finally:
        bus.close()
        mem.close()
        loop.close()


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
            poll = poll_us(d, disk)
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
        "MsgBus.poll in-process us/req": round(poll, 1),
    }]  # fmt: skip
