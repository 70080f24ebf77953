"""atheris target: virtio-msg message *sequences* against a real back-end process
(``python -m edgevirt.backend.transport.virtio_msg``: blk and rng on one bus), through
real shared memory: the driver side is :class:`MsgDriver` (QEMU's ivshmem-doorbell protocol,
the message memory the back-end shares, eventfd doorbells), the virtqueues live in a
carve-out file both map.

Each input is a run of driver connections (a new one once a step broke the message ring):
up to 24 steps — any transport request with fields
from boundary values (status transitions out of order, features, SET_VQUEUE with addresses
inside and outside the carve-out, RESET/GET_VQUEUE, config), EVENT_AVAIL kicks, bus
messages, raw garbage slots, a hostile ``prod`` index, a doorbell without a message, and
guest actions on a real ring in the carve-out (a driver's bring-up, blk/rng requests,
scribbles). Every step ends with a barrier (fuzz/seqharness.py): a bus PING whose
response proves the back-end handled everything before it. Checked after every step: the
process is alive; the carve-out file's guard page (the page after the mapped size) keeps
its pattern; between our own writes the back-end
changed nothing in the message memory's header and to-device slots (it may only move its
consumer index and fill the to-driver ring). After the disconnect: the back-end's fd count
returns to its baseline and its RSS stays within 64 MiB of it.

    PYTHONPATH=. nice .venv/bin/python fuzz/fuzz_virtio_msg_seq.py -max_len=512 \\
        -len_control=0 -timeout=300 -max_total_time=1800
"""

import mmap
import os
import sys
import time
from pathlib import Path

import atheris
import seqharness

with atheris.instrument_imports(include=["edgevirt"]):
    from edgevirt.backend.memory import GuestMemory, Region
    from edgevirt.backend.transport.virtio_msg import channel as ch
    from edgevirt.backend.transport.virtio_msg import protocol as p
    from edgevirt.backend.transport.virtio_msg.driver import MsgDriver
    from edgevirt.backend.transport.virtio_msg.protocol import Message, VirtioMsgError
    from edgevirt.backend.virtq.driver import DriverQueue
    from edgevirt.errors import EdgevirtError

PAGE = 4096
BASE = 0x5C00_0000
CARVE = 256 * PAGE
CANARY = 0x5A
BARRIER_TIMEOUT = 10.0  # a PING is answered at once unless the input broke the ring
REQUESTS = sorted(k for k in p.LAYOUTS if not k[2])  # (bus, msg_id, False)
SPECIAL = [0, 1, 2, 3, 7, 8, 15, 16, 64, 255, 256, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]
ADDRS = [BASE, BASE + 0x1000, BASE + CARVE - 16, BASE + CARVE, BASE - 16, 0, 2**64 - 1]


def _setup(d: Path) -> None:
    with open(d / "carveout", "wb") as f:
        f.truncate(CARVE + PAGE)


def _argv(d: Path) -> list[str]:
    (d / "stats.json").unlink(missing_ok=True)
    (d / "msg.sock").unlink(missing_ok=True)
    return ["-m", "edgevirt.backend.transport.virtio_msg", "--socket", str(d / "msg.sock"),
            "--carveout-file", str(d / "carveout"), "--carveout-base", hex(BASE),
            "--carveout-size", str(CARVE), "--device", f"blk:path={d / 'disk.img'}",
            "--device", "rng", "--stats", str(d / "stats.json")]  # fmt: skip


def _ready(d: Path) -> bool:
    return (d / "stats.json").exists() and (d / "msg.sock").exists()


class Session:
    def __init__(self, backend: seqharness.BackendProcess) -> None:
        fd = os.open(backend.dir / "carveout", os.O_RDWR)
        try:
            self.file_map = mmap.mmap(fd, CARVE + PAGE, flags=mmap.MAP_SHARED)
            self.region_map = mmap.mmap(fd, CARVE, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self.file_map[CARVE:] = bytes([CANARY]) * PAGE
        self.carve = memoryview(self.region_map)
        self.mem = GuestMemory([Region(gpa=BASE, size=CARVE, buf=self.region_map)])
        self.drv = self._connect(backend)
        geo = self.drv.msgmem.geometry
        self.frozen = [(0, ch.EPOCH_OFFSET)]  # header (epoch may move only on restart)
        slots = geo.to_device + ch.RING_SLOTS
        self.frozen.append((slots, slots + geo.nslots * ch.SLOT_SIZE))
        self.snapshot = self._frozen()
        self.queues: dict[tuple[int, int], DriverQueue] = {}
        self.usable = True
        self.released = False

    def _connect(self, backend: seqharness.BackendProcess) -> MsgDriver:
        """A driver on freshly reset rings. The back-end resets the message memory when it
        handles the last driver's disconnect, which may come after its fds were closed (what
        the harness waits for) and even after this connect: rings that are not all zero yet
        belong to the last session, so connect again."""
        deadline = time.monotonic() + seqharness.SETTLE
        while True:
            drv = MsgDriver(str(backend.dir / "msg.sock"), self.mem, timeout=BARRIER_TIMEOUT)
            rings = (drv.msgmem.to_device, drv.msgmem.to_driver)
            if not any(r._words[r._prod] or r._words[r._cons] for r in rings):
                return drv
            drv.close()
            assert time.monotonic() < deadline, "the back-end never reset the message rings"
            time.sleep(0.001)

    def _frozen(self) -> list[bytes]:
        buf = self.drv._map
        return [bytes(buf[a:b]) for a, b in self.frozen]

    def check(self) -> None:
        assert self.file_map[CARVE:].count(CANARY) == PAGE, "back-end wrote past the carve-out"
        assert self._frozen() == self.snapshot, "back-end wrote the header or to-device slots"

    def check_final(self) -> None:
        assert self.file_map[CARVE:].count(CANARY) == PAGE, "back-end wrote past the carve-out"

    def barrier(self) -> bool:
        """A bus PING is answered in ring order: its response means every earlier message
        was handled. What else arrived must decode (else: the back-end's bug)."""
        if not self.usable:
            return True
        token = self.drv.next_token()
        try:
            self.drv.send(Message(int(p.BusMsgId.PING), 0, token, False, True, {"data": token}))
        except VirtioMsgError:  # our end of the ring refuses: the input broke the indices
            self.usable = False
            return True
        self.snapshot = self._frozen()  # after our last write
        try:
            self.drv.wait_for(lambda m: m.response and m.bus and m.token == token)
        except TimeoutError:
            self.usable = False
            return False
        self.drv.stray.clear()
        self.drv.events.clear()
        return True

    def disconnect(self) -> None:
        if not self.released:
            self.drv.close()
            self.released = True

    def release(self) -> None:
        self.disconnect()
        if self.carve is not None:
            self.carve.release()
            self.region_map.close()
            self.file_map.close()
            self.carve = None  # type: ignore[assignment]


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
        ring = s.drv.msgmem.to_device
        prod = fdp.PickValueInList(SPECIAL)
        cons = ring._words[ring._cons]  # = our head: the last barrier was answered
        ring.poke("prod", prod)
        s.drv.ring()
        # Ahead by more than the ring: the back-end stops the ring until we reconnect. Ahead
        # by 1..nslots: it serves stale slots and our head is behind its index; racing it,
        # our next message may land in a slot it already took as stale and be lost. Either
        # way, this session's ring is the input's to break: the next step starts another.
        s.usable = prod == cons
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
        s.release()


backend = seqharness.BackendProcess("edgevirt-msgseq-", _argv, _ready, _setup)


def TestOneInput(data: bytes) -> None:
    seqharness.run_input(backend, atheris.FuzzedDataProvider(data), lambda: Session(backend), step)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
