"""Message memory: the shared region that carries virtio-msg messages, one ring per direction.

Layout (little endian; offsets in bytes; see PROTOCOL.md for the full contract)::

    0x000  header   u32 magic "VMSG", u16 version, u16 slot_size, u32 nslots,
                    u32 device_peer, u32 max_msg_size, u32 to_device, u32 to_driver,
                    u32 revision, u32 epoch (0x24), then zeros up to 0x100
    to_device       ring the driver produces and the device consumes
    to_driver       ring the device produces and the driver consumes

    ring    +0      u32 prod   free-running count of messages published (producer writes)
            +64     u32 cons   free-running count of messages consumed (consumer writes)
            +128    nslots x slot_size bytes; message k lives in slot k % nslots

Each side writes only its own index and keeps a private shadow of it; the other side's index
is hostile: ``prod - cons`` (mod 2**32) must stay within ``0..nslots`` or the ring is broken.
A slot is copied out whole before it is decoded, so a peer rewriting it meanwhile can only
make that one message malformed.

``epoch`` counts the device side's (re)starts: a device side that finds its own layout
(peer mode: the memory outlives it) adopts it, skips what the driver left in the to-device
ring for its predecessor and bumps the epoch; the driver, seeing a new epoch, resets and
re-probes its devices (PROTOCOL.md, "Restart").

Ordering (each point pairs with the mirror point on the other side):

* producer: fill slot, **release**, store prod, then ring the doorbell;
* consumer: load prod, **acquire**, copy the slots, **release**, store cons.

Index words are read and written as single aligned 32-bit accesses (a ``memoryview`` cast),
never byte by byte, so a concurrently updated index is never torn. Python cannot issue
fences: the release/acquire points above hold on x86 (TSO); the one store->load point the
bus needs is covered by the C ring's full fences (see :mod:`.bus`).
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass

from edgevirt.backend.memory import store
from edgevirt.backend.transport.virtio_msg.protocol import (
    HEADER as MSG_HEADER,
)
from edgevirt.backend.transport.virtio_msg.protocol import (
    MAX_MSG_SIZE,
    REVISION,
    VirtioMsgError,
)

if sys.byteorder != "little":  # index words are native 32-bit accesses of little-endian data
    raise ImportError("virtio-msg message memory needs a little-endian host")

MAGIC = 0x47534D56  # b"VMSG" read as a little-endian u32
VERSION = 1
SLOT_SIZE = MAX_MSG_SIZE
HEADER = struct.Struct("<IHHIIIIII")
EPOCH_OFFSET = HEADER.size  # 0x24: a u32 in the once-reserved area (old drivers ignore it)
HEADER_AREA = 0x100
RING_PROD = 0
RING_CONS = 64  # its own cache line: producer and consumer never write the same line
RING_SLOTS = 128
DEFAULT_SIZE = 64 << 10  # ivshmem BAR2 sizes are powers of two
DEFAULT_SLOTS = 64
MIN_SLOTS, MAX_SLOTS = 4, 1024


def _word(buf: memoryview, offset: int) -> int:
    """One aligned 32-bit load (never torn, unlike a byte-wise copy)."""
    with buf.cast("I") as words:
        return int(words[offset // 4])


def pad(raw: bytes) -> bytes:
    """A message as the whole slot it is published in: zeros after it, so nothing of an
    earlier, longer message stays there for the peer to read."""
    return raw + bytes(SLOT_SIZE - len(raw))


def ring_bytes(nslots: int, slot_size: int = SLOT_SIZE) -> int:
    return RING_SLOTS + nslots * slot_size


def _align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


@dataclass(frozen=True)
class Geometry:
    """Where everything lives: what the header says (and what both sides must agree on)."""

    size: int
    nslots: int
    device_peer: int
    to_device: int
    to_driver: int
    slot_size: int = SLOT_SIZE
    max_msg_size: int = MAX_MSG_SIZE

    @classmethod
    def plan(cls, size: int, nslots: int, device_peer: int) -> Geometry:
        if not (MIN_SLOTS <= nslots <= MAX_SLOTS and nslots & (nslots - 1) == 0):
            raise VirtioMsgError(f"{nslots} slots: need a power of two in {MIN_SLOTS}..{MAX_SLOTS}")
        if not 0 <= device_peer <= 0xFFFF:
            raise VirtioMsgError(f"device peer id {device_peer} outside 0..65535")
        to_device = HEADER_AREA
        to_driver = _align(to_device + ring_bytes(nslots), 0x100)
        end = to_driver + ring_bytes(nslots)
        if end > size:
            raise VirtioMsgError(
                f"message memory of {size:#x} bytes cannot hold two rings of {nslots} slots "
                f"({end:#x} bytes needed)"
            )
        return cls(size, nslots, device_peer, to_device, to_driver)

    def pack(self) -> bytes:
        return HEADER.pack(
            MAGIC,
            VERSION,
            self.slot_size,
            self.nslots,
            self.device_peer,
            self.max_msg_size,
            self.to_device,
            self.to_driver,
            REVISION,
        )

    @classmethod
    def parse(cls, buf: bytes | memoryview, size: int) -> Geometry:
        """Validate a header written by the other side (what the guest module checks too)."""
        if size < HEADER_AREA:
            raise VirtioMsgError(f"message memory of {size} bytes is smaller than its header")
        fields = HEADER.unpack_from(buf)
        magic, version, slot_size, nslots, peer, max_size, to_dev, to_drv, rev = fields
        if magic != MAGIC or version != VERSION:
            raise VirtioMsgError(
                f"message memory header: magic {magic:#x} version {version}, expected "
                f"{MAGIC:#x} version {VERSION}"
            )
        if slot_size != SLOT_SIZE or max_size != MAX_MSG_SIZE or rev != REVISION:
            raise VirtioMsgError(
                f"message memory header: slot {slot_size}, max message {max_size}, revision "
                f"{rev}; expected {SLOT_SIZE}, {MAX_MSG_SIZE}, {REVISION}"
            )
        geo = cls.plan(size, nslots, peer)
        if (to_dev, to_drv) != (geo.to_device, geo.to_driver):
            raise VirtioMsgError(
                f"message memory header: rings at {to_dev:#x}/{to_drv:#x}, expected "
                f"{geo.to_device:#x}/{geo.to_driver:#x}"
            )
        return geo


class Ring:
    """One direction. The same class serves the producer and the consumer end."""

    def __init__(self, buf: memoryview, offset: int, nslots: int, name: str) -> None:
        self.name = name
        self.nslots = nslots
        self.offset = offset
        self._bytes = buf
        self._words = buf.cast("I")
        self._prod = (offset + RING_PROD) // 4
        self._cons = (offset + RING_CONS) // 4
        self.slots = offset + RING_SLOTS
        # Private shadows: our own index is never re-read from shared memory.
        self.head = self._words[self._prod]
        self.tail = self._words[self._cons]
        self.broken: str | None = None

    @property
    def buffer(self) -> memoryview:
        """The whole message memory (slots are read in place by :meth:`single`'s callers)."""
        return self._bytes

    def release(self) -> None:
        self._words.release()  # our cast only: the buffer is the MessageMemory's to release

    def reset(self) -> None:
        """Both indices to zero: only while no peer is attached."""
        self._words[self._prod] = self._words[self._cons] = 0
        self.head = self.tail = 0
        self.broken = None

    def poke(self, which: str, value: int) -> None:
        """Overwrite the shared ``prod`` or ``cons`` word as a hostile peer would (tests)."""
        self._words[self._prod if which == "prod" else self._cons] = value & 0xFFFFFFFF

    def _fail(self, why: str) -> VirtioMsgError:
        self.broken = f"{self.name} ring: {why}"
        return VirtioMsgError(self.broken)

    # -- producer end ---------------------------------------------------------------------

    def _used(self) -> int:
        cons = self._words[self._cons]  # the consumer's index: hostile
        used = (self.head - cons) & 0xFFFFFFFF
        if used > self.nslots:
            raise self._fail(
                f"consumer index {cons} is {used} behind producer index {self.head}, more "
                f"than the {self.nslots} slots"
            )
        return used

    def put(self, raw: bytes) -> int | None:
        """Publish one message; returns its position, or None when the ring is full."""
        if self.broken:
            raise VirtioMsgError(self.broken)
        if not MSG_HEADER.size <= len(raw) <= SLOT_SIZE:
            raise VirtioMsgError(f"{self.name}: message of {len(raw)} bytes does not fit a slot")
        if self._used() == self.nslots:
            return None
        pos = self.head
        off = self.slots + (pos % self.nslots) * SLOT_SIZE
        self._bytes[off : off + SLOT_SIZE] = raw if len(raw) == SLOT_SIZE else pad(raw)
        # ordering: release - the slot bytes above are visible before the new prod (TSO).
        self.head = (pos + 1) & 0xFFFFFFFF
        self._words[self._prod] = self.head
        return pos

    def unconsumed(self, pos: int) -> bool:
        """Is the message published at ``pos`` still waiting for the consumer?"""
        return ((pos - self._words[self._cons]) & 0xFFFFFFFF) < self._used()

    def free(self) -> int:
        return self.nslots - self._used()

    def skip(self) -> int:
        """Consumer end: drop everything published so far (a restarted device side does not
        serve what the driver sent its predecessor). Returns how many were dropped."""
        n = self.available()
        self.tail = (self.tail + n) & 0xFFFFFFFF
        self._words[self._cons] = self.tail
        return n

    # -- consumer end ---------------------------------------------------------------------

    def available(self) -> int:
        prod = self._words[self._prod]  # the producer's index: hostile
        ready = (prod - self.tail) & 0xFFFFFFFF
        if ready > self.nslots:
            raise self._fail(
                f"producer index {prod} is {ready} ahead of consumer index {self.tail}, more "
                f"than the {self.nslots} slots"
            )
        return ready

    def single(self) -> int | None:
        """Consumer end: the offset of the slot of the one message waiting, None when there
        are none or several (the caller then takes :meth:`get`'s path). The slot is read in
        place, once: copy its fields out before checking them."""
        if self.broken or self.available() != 1:
            return None
        # ordering: acquire - prod was loaded above, before the slot bytes (TSO).
        return self.slots + (self.tail % self.nslots) * SLOT_SIZE

    def advance(self) -> None:
        """Hand back the slot :meth:`single` named."""
        # ordering: release - the caller's copy is complete before the slot is handed back.
        self.tail = (self.tail + 1) & 0xFFFFFFFF
        self._words[self._cons] = self.tail

    def get(self) -> bytes | None:
        """Copy out the next message's slot (the whole slot; decode looks at msg_size)."""
        if self.broken:
            raise VirtioMsgError(self.broken)
        if not self.available():
            return None
        # ordering: acquire - prod was loaded above, before the slot bytes (TSO).
        off = self.slots + (self.tail % self.nslots) * SLOT_SIZE
        raw = bytes(self._bytes[off : off + SLOT_SIZE])
        self.advance()
        return raw


class MessageMemory:
    """Header + two rings over ``buf``; ``role`` says which end of each ring we are."""

    def __init__(self, buf: memoryview, geometry: Geometry) -> None:
        self.geometry = geometry
        self._buf = buf
        self.skipped = 0  # to-device messages left by a previous device side, not served
        self.to_device = Ring(buf, geometry.to_device, geometry.nslots, "to-device")
        self.to_driver = Ring(buf, geometry.to_driver, geometry.nslots, "to-driver")

    @classmethod
    def create(
        cls, buf: memoryview, nslots: int = DEFAULT_SLOTS, device_peer: int = 0
    ) -> MessageMemory:
        """The device side lays the memory out: zeroed rings, then the header."""
        geo = Geometry.plan(len(buf), nslots, device_peer)
        header = geo.pack()
        # A layout of somebody else's (other slots, other peer): still a new epoch for a
        # driver that was attached to it.
        old = _word(buf, 0) == MAGIC and len(buf) >= HEADER_AREA
        epoch = (_word(buf, EPOCH_OFFSET) + 1) & 0xFFFFFFFF if old else 1
        buf[:] = bytes(len(buf))
        buf[4 : HEADER.size] = header[4:]
        store(buf, EPOCH_OFFSET, "I", epoch or 1)
        # ordering: release - the magic goes last: a driver waiting for it (the guest module
        # polls while the device side is not up yet) then finds the rest complete (TSO).
        buf[:4] = header[:4]
        return cls(buf, geo)

    @classmethod
    def adopt_or_create(
        cls, buf: memoryview, nslots: int = DEFAULT_SLOTS, device_peer: int = 0
    ) -> tuple[MessageMemory, bool]:
        """Peer mode: memory that outlives us (a restarted device side finds its own layout
        and the driver's indices); keep a valid, sane layout of ours, else lay it out anew.
        Returns the memory and whether it was adopted."""
        try:
            geo = Geometry.parse(buf, len(buf))
            if geo.nslots == nslots and geo.device_peer == device_peer:
                mm = cls(buf, geo)
                try:
                    mm.to_device.available()  # raises if the indices are insane
                    mm.to_driver.free()
                except VirtioMsgError:
                    mm.to_device.release()
                    mm.to_driver.release()
                    raise
                mm.skipped = mm.to_device.skip()
                # ordering: release - the skipped consumer index is visible before the new
                # epoch that tells the driver to start over (TSO).
                mm.epoch = (mm.epoch + 1) & 0xFFFFFFFF or 1
                return mm, True
        except VirtioMsgError:
            pass
        return cls.create(buf, nslots, device_peer), False

    @classmethod
    def attach(cls, buf: memoryview) -> MessageMemory:
        """The driver side checks the header the device wrote."""
        return cls(buf, Geometry.parse(buf, len(buf)))

    @property
    def epoch(self) -> int:
        return _word(self._buf, EPOCH_OFFSET)

    @epoch.setter
    def epoch(self, value: int) -> None:
        store(self._buf, EPOCH_OFFSET, "I", value & 0xFFFFFFFF)

    def reset(self) -> None:
        self.to_device.reset()
        self.to_driver.reset()

    def close(self) -> None:
        self.to_device.release()
        self.to_driver.release()
        self._buf.release()
