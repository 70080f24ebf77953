"""Driver side of a split virtqueue: a mock guest driver for tests and users.

:class:`DriverQueue` lays out the descriptor table, avail ring and used ring in guest memory,
adds chains (direct or indirect) with buffers it allocates there, publishes avail->idx and
reads used entries back, like a guest's virtio driver would. The ``write_*``/``corrupt_*``
helpers break the rings on purpose, for negative tests of the device side::

    mem = GuestMemory()
    mem.add(anonymous(0x4000_0000, 1 << 20))
    drv = DriverQueue(mem, 8)
    q = drv.queue()                       # a SplitQueue on the same rings
    head = drv.add([b"request"], [512])   # one readable, one writable buffer
    [(head, readable, writable)] = q.pop(mem)
    q.push(mem, [(head, 512)])
    assert drv.get_used() == [(head, 512)]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edgevirt.backend.memory import GuestMemory, store
from edgevirt.backend.virtq.pyring import (
    DESC,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    MAX_QUEUE_SIZE,
    U16,
    USED_ELEM,
)
from edgevirt.errors import GuestMemoryError


def _align(value: int, align: int) -> int:
    return (value + align - 1) // align * align


class DriverQueue:
    """The guest's view of one split virtqueue laid out at ``base`` (default: the start of
    the first region) followed by a bump-allocated data area up to the end of that region."""

    def __init__(
        self, mem: GuestMemory, size: int, *, base: int | None = None, event_idx: bool = False
    ) -> None:
        if not (1 <= size <= MAX_QUEUE_SIZE and size & (size - 1) == 0):
            raise ValueError(f"queue size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        if not mem.regions:
            raise GuestMemoryError("DriverQueue needs a mapped region")
        self.mem = mem
        self.size = size
        self.event_idx = event_idx
        start = mem.regions[0].gpa if base is None else base
        region = next((r for r in mem.regions if r.gpa <= start < r.end), None)
        if region is None:
            raise GuestMemoryError(f"queue base {start:#x} is not mapped ({mem.describe()})")
        self.desc = _align(start, 16)
        self.avail = self.desc + 16 * size
        self.used = _align(self.avail + 6 + 2 * size, 4)
        self.data_start = _align(self.used + 6 + 8 * size, 16)
        self.data_end = region.end
        self.reset_data()
        self.write(self.desc, bytes(self.data_start - self.desc))  # also checks it fits
        self.avail_idx = 0  # the driver's shadow of avail->idx, published by publish()
        self.last_used_idx = 0
        self._free = list(range(size))
        self._chains: dict[int, list[int]] = {}

    # ---- plumbing ----

    def queue(self, cls: Any = None) -> Any:
        """A device-side SplitQueue (default implementation, or ``cls``) on these rings."""
        if cls is None:
            from edgevirt.backend.virtq import SplitQueue

            cls = SplitQueue
        return cls(self.size, self.desc, self.avail, self.used, event_idx=self.event_idx)

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.mem.translate(gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        self.mem.translate(gpa, len(data))[:] = data

    def reset_data(self) -> None:
        """Forget every buffer allocated so far (the data area is reused from its start)."""
        self._next_data = self.data_start

    def alloc(self, length: int, data: bytes = b"", align: int = 16) -> int:
        """Allocate ``length`` bytes in the data area, filled with ``data`` then zeros."""
        gpa = _align(self._next_data, align)
        if length < len(data) or gpa + length > self.data_end:
            raise GuestMemoryError(
                f"data area exhausted: {length:#x} bytes at {gpa:#x}, end {self.data_end:#x}"
            )
        self._next_data = gpa + length
        self.write(gpa, data + bytes(length - len(data)))
        return gpa

    # ---- what a driver does ----

    def add(
        self,
        readable: Sequence[bytes] = (),
        writable: Sequence[int] = (),
        *,
        indirect: bool = False,
        publish: bool = True,
    ) -> int:
        """Add a chain of device-readable buffers (their contents) then device-writable
        buffers (their lengths); returns its head. ``indirect`` puts the buffers in an
        indirect table that one descriptor of the ring refers to."""
        bufs = [(self.alloc(len(d), d), len(d), 0) for d in readable]
        bufs += [(self.alloc(n), n, DESC_F_WRITE) for n in writable]
        if not bufs:
            raise ValueError("a chain needs at least one buffer")
        if indirect:
            table = [
                (addr, n, flags | (DESC_F_NEXT if k + 1 < len(bufs) else 0), k + 1)
                for k, (addr, n, flags) in enumerate(bufs)
            ]
            gpa = self.write_indirect(table)
            bufs = [(gpa, 16 * len(table), DESC_F_INDIRECT)]
        if len(bufs) > len(self._free):
            raise ValueError(f"{len(bufs)} descriptors needed, {len(self._free)} free")
        ids = [self._free.pop(0) for _ in bufs]
        for k, (addr, n, flags) in enumerate(bufs):
            more = k + 1 < len(bufs)
            self.write_desc(ids[k], addr, n, flags | (DESC_F_NEXT if more else 0),
                            ids[k + 1] if more else 0)  # fmt: skip
        self._chains[ids[0]] = ids
        self.make_available(ids[0], publish=publish)
        return ids[0]

    def make_available(self, head: int, *, publish: bool = True) -> None:
        """Put ``head`` in the next avail ring slot (and publish avail->idx)."""
        self.write_avail_entry(self.avail_idx % self.size, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish:
            self.publish()

    def publish(self) -> None:
        """Store avail->idx (after the ring entries, as a driver's write barrier orders it)."""
        self.set_avail_idx(self.avail_idx)

    def get_used(self) -> list[tuple[int, int]]:
        """The (id, len) entries the device added since the last call; frees their chains."""
        out = []
        while self.last_used_idx != self.used_idx:
            slot = self.last_used_idx % self.size
            head, written = USED_ELEM.unpack(self.read(self.used + 4 + 8 * slot, 8))
            out.append((head, written))
            self._free.extend(self._chains.pop(head, []))
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
        return out

    # ---- fields of the rings ----

    def _ld16(self, gpa: int) -> int:
        value: int = U16.unpack(self.read(gpa, 2))[0]
        return value

    def _st16(self, gpa: int, value: int) -> None:
        store(self.mem.translate(gpa, 2), 0, "H", value & 0xFFFF)  # the device reads it now

    @property
    def used_idx(self) -> int:
        """used->idx as the device last stored it."""
        return self._ld16(self.used + 2)

    @property
    def used_flags(self) -> int:
        return self._ld16(self.used)

    @property
    def avail_event(self) -> int:
        """The used ring's trailing u16 (event_idx): the device wants a kick past it."""
        return self._ld16(self.used + 4 + 8 * self.size)

    @property
    def used_event(self) -> int:
        return self._ld16(self.avail + 4 + 2 * self.size)

    def set_used_event(self, value: int) -> None:
        """The avail ring's trailing u16 (event_idx): interrupt me once used->idx passes it."""
        self._st16(self.avail + 4 + 2 * self.size, value)

    def set_avail_flags(self, flags: int) -> None:
        """avail->flags, e.g. VRING_AVAIL_F_NO_INTERRUPT (1)."""
        self._st16(self.avail, flags)

    # ---- raw writers, for building hostile rings ----

    def set_avail_idx(self, value: int) -> None:
        self._st16(self.avail + 2, value)

    def write_avail_entry(self, slot: int, head: int) -> None:
        self._st16(self.avail + 4 + 2 * (slot % self.size), head)

    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, next: int = 0) -> None:
        self.write(self.desc + 16 * index, DESC.pack(addr, length, flags, next))

    def read_desc(self, index: int) -> tuple[int, int, int, int]:
        addr, length, flags, nxt = DESC.unpack(self.read(self.desc + 16 * index, 16))
        return addr, length, flags, nxt

    def write_indirect(self, descs: Sequence[tuple[int, int, int, int]]) -> int:
        """Allocate an indirect table holding raw (addr, len, flags, next) entries."""
        gpa = self.alloc(16 * len(descs))
        self.write(gpa, b"".join(DESC.pack(*d) for d in descs))
        return gpa

    def corrupt_desc(
        self,
        index: int,
        *,
        addr: int | None = None,
        length: int | None = None,
        flags: int | None = None,
        next: int | None = None,
    ) -> None:
        """Overwrite some fields of descriptor ``index`` of the ring's table."""
        old = self.read_desc(index)
        new = [old[k] if v is None else v for k, v in enumerate((addr, length, flags, next))]
        self.write_desc(index, *new)
