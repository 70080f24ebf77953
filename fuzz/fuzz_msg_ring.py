"""atheris target: the virtio-msg message memory as a hostile peer leaves it: the header
(magic, version, slot size, slot count, peer, ring offsets, revision, epoch) and both rings'
``prod``/``cons`` words, then a sequence of ring operations while the peer keeps rewriting
its index.

Structure-aware: start from a valid 64 KiB layout, overwrite fields chosen by the input with
values chosen by the input (boundary values favoured), then run the driver's ``attach``, the
restarted device side's ``adopt_or_create``, and up to 16 operations (put/get/available/
free/skip/unconsumed, a peer poke in between). Invariants: fuzz/guard.py (only
``VirtioMsgError``); after ``adopt_or_create`` the header parses and names our geometry;
no operation changes a byte outside the ring it works on, the producer never advances more
than ``nslots`` past the consumer it saw, and ``get`` returns whole slots.

    PYTHONPATH=. .venv/bin/python fuzz/fuzz_msg_ring.py fuzz/corpus/msg_ring -max_len=256
"""

import struct
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guard import Guard  # noqa: E402

with atheris.instrument_imports(include=["edgevirt"]):
    from edgevirt.backend.transport.virtio_msg import channel as ch
    from edgevirt.backend.transport.virtio_msg.protocol import VirtioMsgError

SIZE = 64 << 10
NSLOTS = 16
guard = Guard(allowed=(VirtioMsgError,))
_template = bytearray(SIZE)
_mm = ch.MessageMemory.create(memoryview(_template), NSLOTS, 1)
GEO = _mm.geometry
_mm.close()
FIELDS = [0, 4, 6, 8, 12, 16, 20, 24, 28, ch.EPOCH_OFFSET]  # header u32/u16 offsets
INDEXES = [GEO.to_device + ch.RING_PROD, GEO.to_device + ch.RING_CONS,
           GEO.to_driver + ch.RING_PROD, GEO.to_driver + ch.RING_CONS]  # fmt: skip
SPECIAL = [0, 1, NSLOTS - 1, NSLOTS, NSLOTS + 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xFFFFFFF0]


def value(fdp: atheris.FuzzedDataProvider) -> int:
    return (
        fdp.PickValueInList(SPECIAL) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 2**32 - 1)
    )


def region(ring: ch.Ring) -> tuple[int, int]:
    return ring.offset, ring.offset + ch.ring_bytes(ring.nslots)


def outside(buf: bytearray, lo: int, hi: int) -> bytes:
    return bytes(buf[:lo]) + bytes(buf[hi:])


def check(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    buf = bytearray(_template)
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        off = fdp.PickValueInList(FIELDS + INDEXES)
        struct.pack_into("<I", buf, off, value(fdp))
    view = memoryview(buf)
    try:
        ch.MessageMemory.attach(view).close()
    except VirtioMsgError:
        pass
    view = memoryview(buf)
    mm, adopted = ch.MessageMemory.adopt_or_create(view, NSLOTS, 1)
    assert ch.Geometry.parse(buf, SIZE) == GEO
    try:
        for _ in range(fdp.ConsumeIntInRange(0, 16)):
            ring = mm.to_driver if fdp.ConsumeBool() else mm.to_device
            lo, hi = region(ring)
            before = outside(buf, lo, hi)
            op = fdp.ConsumeIntInRange(0, 6)
            try:
                if op == 0:
                    ring.poke(fdp.PickValueInList(["prod", "cons"]), value(fdp))
                elif op == 1:
                    head = ring.head
                    pos = ring.put(b"\x00\x01" + fdp.ConsumeBytes(fdp.ConsumeIntInRange(6, 300)))
                    if pos is not None:
                        assert pos == head
                elif op == 2:
                    raw = ring.get()
                    assert raw is None or len(raw) == ch.SLOT_SIZE
                elif op == 3:
                    assert 0 <= ring.available() <= ring.nslots
                elif op == 4:
                    assert 0 <= ring.free() <= ring.nslots
                elif op == 5:
                    assert 0 <= ring.skip() <= ring.nslots
                else:
                    ring.unconsumed(value(fdp))
            except VirtioMsgError:
                assert ring.broken or op == 1, "an error that does not mark the ring broken"
            assert outside(buf, lo, hi) == before, f"op {op} wrote outside its ring"
    finally:
        mm.close()
    del adopted


def TestOneInput(data: bytes) -> None:
    guard.run(lambda out: check(data))


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
