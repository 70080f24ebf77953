"""atheris target: virtio-msg message *sequences* against a real back-end process
(``python -m edgevirt.backend.transport.virtio_msg``: blk and rng on one bus), through
real shared memory: the driver side is :class:`MsgDriver` (QEMU's ivshmem-doorbell protocol,
the message memory the back-end shares, eventfd doorbells), the virtqueues live in a
carve-out file both map.

Each input is one driver connection: up to 24 steps — any transport request with fields
from boundary values (status transitions out of order, features, SET_VQUEUE with addresses
inside and outside the carve-out, RESET/GET_VQUEUE, config), EVENT_AVAIL kicks, bus
messages, raw garbage slots, a hostile ``prod`` index, a doorbell without a message, and
guest actions on a real ring in the carve-out (a driver's bring-up, blk/rng requests,
scribbles). Checked after every step: the process is alive; the carve-out file's guard page
(the page after the mapped size) keeps its pattern; between our own writes the back-end
changed nothing in the message memory's header and to-device slots (it may only move its
consumer index and fill the to-driver ring). After the disconnect: the back-end's fd count
returns to its baseline and its RSS stays within 64 MiB of it.

    PYTHONPATH=. nice .venv/bin/python fuzz/fuzz_virtio_msg_seq.py -max_len=512 \\
        -timeout=60 -max_total_time=1800
"""

import ctypes
import mmap
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["edgevirt"]):
    from edgevirt.backend.memory import GuestMemory, Region
    from edgevirt.backend.transport.virtio_msg import channel as ch
    from edgevirt.backend.transport.virtio_msg import protocol as p
    from edgevirt.backend.transport.virtio_msg.driver import MsgDriver
    from edgevirt.backend.virtq.driver import DriverQueue
    from edgevirt.errors import EdgevirtError

ROOT = Path(__file__).resolve().parent.parent
PAGE = 4096
BASE = 0x5C00_0000
CARVE = 256 * PAGE
CANARY = 0x5A
RSS_SLACK = 64 << 20
REQUESTS = sorted(k for k in p.LAYOUTS if not k[2])  # (bus, msg_id, False)
SPECIAL = [0, 1, 2, 3, 7, 8, 15, 16, 64, 255, 256, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]
ADDRS = [BASE, BASE + 0x1000, BASE + CARVE - 16, BASE + CARVE, BASE - 16, 0, 2**64 - 1]


def _die_with_parent() -> None:
    """libFuzzer exits without running Python's atexit: the kernel ends the back-end then."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Backend:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="edgevirt-msgseq-"))
        self.carve_file = self.dir / "carveout"
        with open(self.carve_file, "wb") as f:
            f.truncate(CARVE + PAGE)
        (self.dir / "disk.img").touch()
        os.truncate(self.dir / "disk.img", 4 << 20)
        self.sock = self.dir / "msg.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.sock.unlink(missing_ok=True)
        stats = self.dir / "stats.json"
        stats.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgevirt.backend.transport.virtio_msg", "--socket",
             str(self.sock), "--carveout-file", str(self.carve_file), "--carveout-base",
             hex(BASE), "--carveout-size", str(CARVE), "--device",
             f"blk:path={self.dir / 'disk.img'}", "--device", "rng", "--stats", str(stats)],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "backend.log", "ab"),  # noqa: SIM115
            preexec_fn=_die_with_parent,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not (stats.exists() and self.sock.exists()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"back-end did not start; see {self.dir / 'backend.log'}")
            time.sleep(0.05)
        time.sleep(0.2)
        self.baseline_fds, self.baseline_rss = self.fds(), self.rss()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def fds(self) -> int:
        assert self.proc is not None
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def rss(self) -> int:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def restart(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.start()


class Session:
    def __init__(self, backend: Backend) -> None:
        fd = os.open(backend.carve_file, os.O_RDWR)
        try:
            self.file_map = mmap.mmap(fd, CARVE + PAGE, flags=mmap.MAP_SHARED)
            self.region_map = mmap.mmap(fd, CARVE, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self.file_map[CARVE:] = bytes([CANARY]) * PAGE
        self.carve = memoryview(self.region_map)
        self.mem = GuestMemory([Region(gpa=BASE, size=CARVE, buf=self.region_map)])
        self.drv = MsgDriver(str(backend.sock), self.mem, timeout=1.0)
        geo = self.drv.msgmem.geometry
        self.frozen = [(0, ch.EPOCH_OFFSET)]  # header (epoch may move only on restart)
        slots = geo.to_device + ch.RING_SLOTS
        self.frozen.append((slots, slots + geo.nslots * ch.SLOT_SIZE))
        self.snapshot = self._frozen()
        self.queues: dict[tuple[int, int], DriverQueue] = {}

    def _frozen(self) -> list[bytes]:
        buf = self.drv._map
        return [bytes(buf[a:b]) for a, b in self.frozen]

    def checks(self) -> None:
        assert self.file_map[CARVE:].count(CANARY) == PAGE, "back-end wrote past the carve-out"
        assert self._frozen() == self.snapshot, "back-end wrote the header or to-device slots"

    def after_our_writes(self) -> None:
        self.drv.receive()  # whatever the back-end sent must decode (else: its bug)
        self.snapshot = self._frozen()

    def close(self) -> None:
        self.drv.close()
        self.carve.release()
        self.region_map.close()
        self.file_map.close()


def _fields(fdp: atheris.FuzzedDataProvider, layout: p.Layout) -> dict[str, int]:
    out = {}
    for name, code in zip(layout.fields, layout.struct.format.lstrip("<"), strict=True):
        limit = {"H": 0xFFFF, "I": 0xFFFFFFFF, "Q": 2**64 - 1}[code]
        if code == "Q" and fdp.ConsumeBool():
            out[name] = fdp.PickValueInList(ADDRS) & limit
        else:
            out[name] = fdp.PickValueInList(SPECIAL) & limit
    return out


def step(s: Session, fdp: atheris.FuzzedDataProvider) -> None:
    try:
        _step(s, fdp)
    except (EdgevirtError, TimeoutError):
        pass  # the driver side gave up on this step (ring full, no answer): keep going
    s.after_our_writes()


def _step(s: Session, fdp: atheris.FuzzedDataProvider) -> None:
    op = fdp.ConsumeIntInRange(0, 11)
    dev = fdp.PickValueInList([0, 0, 1, 1, 2, 0xFFFF])
    if op <= 3:  # any request, fields from boundary values
        bus, msg_id, _ = REQUESTS[fdp.ConsumeIntInRange(0, len(REQUESTS) - 1)]
        layout = p.LAYOUTS[(bus, msg_id, False)]
        fields = _fields(fdp, layout)
        tail = fdp.ConsumeBytes(min(layout.tail_len(fields), 200)) if layout.tail_count else b""
        token = s.drv.next_token()
        msg = p.Message(int(msg_id), 0 if bus else dev, token, False, bus, fields, tail)
        try:
            s.drv.send(msg)
        except EdgevirtError:  # the encoder refused the combination: send it raw instead
            s.drv.send_raw(bytes(8) + fdp.ConsumeBytes(64))
    elif op == 4:  # a driver's bring-up of blk (0) or rng (1), queue 0
        dev = dev & 1
        q = DriverQueue(s.mem, 16, base=BASE + dev * 0x8000)
        s.drv.negotiate(dev, s.drv.features(dev) & ~(1 << 29))
        s.drv.setup_queue(dev, 0, q)
        s.drv.driver_ok(dev)
        s.queues[(dev, 0)] = q
    elif op == 5:  # a request on a ring we set up, then EVENT_AVAIL
        if not s.queues:
            return
        (dev, idx), q = sorted(s.queues.items())[fdp.ConsumeIntInRange(0, len(s.queues) - 1)]
        q.reset_data()
        try:
            if dev == 0:
                kind = fdp.PickValueInList([0, 1, 4, 8, 99])
                sector = fdp.ConsumeIntInRange(0, 9000)
                hdr = kind.to_bytes(4, "little") + bytes(4) + sector.to_bytes(8, "little")
                q.add([hdr, bytes(512)] if kind == 1 else [hdr], [1] if kind == 1 else [512, 1])
            else:
                q.add([], [fdp.PickValueInList([1, 64, 4096])])
        except (EdgevirtError, ValueError):
            return
        s.drv.kick(dev, idx)
    elif op == 6:  # the guest scribbles over its carve-out
        off = fdp.ConsumeIntInRange(0, CARVE - 1)
        data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 64))[: CARVE - off]
        s.carve[off : off + len(data)] = data
    elif op == 7:  # raw garbage in one slot
        s.drv.send_raw(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, ch.SLOT_SIZE)) or b"\0" * 8)
    elif op == 8:  # the driver's producer index goes hostile
        s.drv.msgmem.to_device.poke("prod", fdp.PickValueInList(SPECIAL))
        s.drv.ring()
    elif op == 9:  # a doorbell with nothing new
        s.drv.ring()
    else:  # EVENT_AVAIL for any queue
        s.drv.kick(dev, fdp.PickValueInList([0, 1, 2, 255]))


def served_once() -> bool:
    """The generator's bring-up and a blk read are served (a test runs this)."""
    s = Session(backend)
    try:
        q = DriverQueue(s.mem, 16, base=BASE)
        s.drv.negotiate(0, s.drv.features(0) & ~(1 << 29))
        s.drv.setup_queue(0, 0, q)
        s.drv.driver_ok(0)
        q.add([bytes(16)], [512, 1])
        s.drv.kick(0, 0)
        s.drv.wait_used(0, 0)
        return len(q.get_used()) == 1
    finally:
        s.close()


backend = Backend()


def TestOneInput(data: bytes) -> None:
    if not backend.alive():
        backend.restart()
    fdp = atheris.FuzzedDataProvider(data)
    s = Session(backend)
    try:
        for _ in range(fdp.ConsumeIntInRange(1, 24)):
            step(s, fdp)
            assert backend.alive(), f"back-end died (exit {backend.proc.returncode})"  # type: ignore[union-attr]
            s.checks()
    finally:
        s.close()
    deadline = time.monotonic() + 5
    while backend.alive() and backend.fds() > backend.baseline_fds and time.monotonic() < deadline:
        time.sleep(0.01)
    # the input that killed the back-end is the one reported (a zombie has no fds)
    assert backend.alive(), f"back-end died (exit {backend.proc.returncode}); see its log"  # type: ignore[union-attr]
    assert backend.fds() <= backend.baseline_fds, (
        f"fd leak: {backend.fds()} open after disconnect, baseline {backend.baseline_fds}"
    )
    assert backend.rss() < backend.baseline_rss + RSS_SLACK, (
        f"RSS {backend.rss() >> 20} MiB, baseline {backend.baseline_rss >> 20} MiB"
    )


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
