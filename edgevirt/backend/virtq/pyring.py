"""Split virtqueue, device side (virtio 1.x section 2.7): the pure-Python reference.

:class:`SplitQueue` here and in the C extension ``_ring`` have the same API, the same
semantics and the same error messages; ``tests/test_virtq.py`` runs one suite against both
and feeds both the same random (also hostile) rings. Read this file to learn what the C code
does.

Guest memory is never owned: every call takes ``mem``, any object whose ``table`` attribute
is a sequence of ``(gpa, writable buffer)`` pairs (:class:`edgevirt.backend.memory.GuestMemory`
is one). Everything read from it is hostile until checked (DESIGN section 6); the first
violation raises :class:`RingError` (with ``rule``) or :class:`GuestMemoryError`, logs it, and
marks the queue broken: later calls raise ``RingError(rule="broken")``. Argument mistakes of
the caller (``TypeError``, ``ValueError``, ``OverflowError``, ``BufferError``) do not.

Layout (all little endian)::

    desc  = size x {u64 addr, u32 len, u16 flags, u16 next}
    avail = u16 flags, u16 idx, u16 ring[size], u16 used_event
    used  = u16 flags, u16 idx, {u32 id, u32 len}[size], u16 avail_event

Memory ordering: the C implementation places a fence at each ordering point, each with a
one-line reason; here the same points are marked ``# ordering:``. Pure Python cannot issue
fences, so use the C implementation against a live guest on a weakly ordered CPU.

A queue is driven by one thread at a time, as in every virtqueue implementation.
"""

from __future__ import annotations

import logging
import operator
import struct
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from edgevirt.backend.memory import store
from edgevirt.errors import GuestMemoryError, RingError

log = logging.getLogger("edgevirt.backend.virtq")

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
MAX_QUEUE_SIZE = 32768
MAX_INDIRECT = 65535
#: pop() starts no new chain once the chains it holds have this many buffers, which bounds
#: the work and memory of one call (a hostile guest can point every head at the same
#: 65535-entry indirect table). Callers loop until pop() returns nothing.
POP_SEGMENT_BUDGET = 65536
_MAX_WINDOWS_SHOWN = 8

# The binary layouts, in one place (driver.py and the tests use them too).
U16 = struct.Struct("<H")  # avail/used flags and idx, avail ring entries, used/avail_event
DESC = struct.Struct("<QIHH")  # addr, len, flags, next
USED_ELEM = struct.Struct("<II")  # id, len; also one entry of push_batch()'s buffer
#: pop_batch() records: a chain (head, readable count, writable count, index of its first
#: segment) and a segment (gpa, len); a chain's readable segments come before its writable.
BATCH_CHAIN = struct.Struct("<IIII")
BATCH_SEGMENT = struct.Struct("<QQ")

#: A buffer of a chain: (guest-physical address, length).
Segment = tuple[int, int]
#: A descriptor chain: (head, device-readable buffers, device-writable buffers).
Chain = tuple[int, list[Segment], list[Segment]]


class MemoryTable(Protocol):
    """What ring calls need from guest memory (GuestMemory provides it)."""

    @property
    def table(self) -> Sequence[tuple[int, Any]]: ...


class _Guest:
    """The windows of ``mem.table``, with views released when the call ends."""

    def __init__(self) -> None:
        self.views: list[memoryview] = []
        self.windows: list[tuple[int, int, memoryview]] = []

    def load(self, mem: MemoryTable) -> None:
        for i, item in enumerate(tuple(mem.table)):
            if not isinstance(item, tuple) or len(item) != 2:
                raise TypeError(f"mem.table[{i}] must be a (gpa, buffer) tuple")
            gpa = operator.index(item[0])
            if not 0 <= gpa < 1 << 64:
                raise OverflowError(f"mem.table[{i}]: gpa {gpa} is not a 64-bit address")
            view = memoryview(item[1])
            self.views.append(view)
            if view.readonly:
                raise BufferError("Object is not writable.")
            if not view.c_contiguous:
                raise BufferError(f"mem.table[{i}]: buffer is not contiguous")
            flat = view.cast("B")
            self.views.append(flat)
            if flat.nbytes > (1 << 64) - 1 - gpa:
                raise ValueError(
                    f"mem.table[{i}]: region at 0x{gpa:x} of {flat.nbytes} bytes wraps the "
                    "64-bit address space"
                )
            self.windows.append((gpa, flat.nbytes, flat))

    def close(self) -> None:
        for view in reversed(self.views):
            view.release()

    def find(self, gpa: int, length: int) -> tuple[memoryview, int] | None:
        """(view, offset) of [gpa, gpa+length) if it lies inside one window."""
        for base, size, view in self.windows:
            if gpa >= base and gpa - base <= size and length <= size - (gpa - base):
                return view, gpa - base
        return None

    def fail(self, what: str, gpa: int, length: int) -> GuestMemoryError:
        shown = [f"[0x{g:x}, 0x{g + s:x})" for g, s, _ in self.windows[:_MAX_WINDOWS_SHOWN]]
        if len(self.windows) > _MAX_WINDOWS_SHOWN:
            shown.append("...")
        windows = ", ".join(shown) or "nothing mapped"
        return GuestMemoryError(
            f"{what} [0x{gpa:x}, +0x{length:x}) lies outside the carve-out ({windows})"
        )


@contextmanager
def _guest(mem: MemoryTable) -> Iterator[_Guest]:
    g = _Guest()
    try:
        g.load(mem)
        yield g
    finally:  # the single exit: every view released
        g.close()


def _ld16(ref: tuple[memoryview, int], off: int) -> int:
    value: int = U16.unpack_from(ref[0], ref[1] + off)[0]
    return value


def _st16(ref: tuple[memoryview, int], off: int, value: int) -> None:
    store(ref[0], ref[1] + off, "H", value & 0xFFFF)  # the driver reads it concurrently


def _u64(value: int, name: str) -> int:
    v = operator.index(value)
    if not 0 <= v < 1 << 64:
        raise OverflowError(f"{name} must be in 0..2**64-1")
    return v


class SplitQueue:
    """Device side of one split virtqueue whose rings live at the given guest addresses."""

    __slots__ = (
        "_size", "_desc", "_avail", "_used", "_last_avail_idx", "_used_idx",
        "_signalled_used", "_event_idx", "_broken",
    )  # fmt: skip

    def __init__(
        self, size: int, desc: int, avail: int, used: int, *, event_idx: bool = False
    ) -> None:
        n = operator.index(size)
        addrs = [_u64(desc, "desc"), _u64(avail, "avail"), _u64(used, "used")]
        if not (1 <= n <= MAX_QUEUE_SIZE and n & (n - 1) == 0):
            raise RingError(
                f"queue size {size!r} is not a power of two in 1..{MAX_QUEUE_SIZE}", "size"
            )
        for addr, name, align in zip(addrs, ("desc", "avail", "used"), (16, 2, 4), strict=True):
            if addr % align:
                raise RingError(
                    f"{name} address 0x{addr:x} is not {align}-byte aligned", f"{name}_align"
                )
        self._size = n
        self._desc, self._avail, self._used = addrs
        self._last_avail_idx = self._used_idx = self._signalled_used = 0
        self._event_idx = bool(event_idx)
        self._broken: str | None = None

    @property
    def size(self) -> int:
        """Queue size (a power of two)."""
        return self._size

    @property
    def desc(self) -> int:
        """Guest-physical address of the descriptor table."""
        return self._desc

    @property
    def avail(self) -> int:
        """Guest-physical address of the avail ring."""
        return self._avail

    @property
    def used(self) -> int:
        """Guest-physical address of the used ring."""
        return self._used

    @property
    def broken(self) -> str | None:
        """None, or the message of the error that broke the queue."""
        return self._broken

    @property
    def last_avail_idx(self) -> int:
        """Next avail idx to pop (vhost-user SET_VRING_BASE sets it)."""
        return self._last_avail_idx

    @last_avail_idx.setter
    def last_avail_idx(self, value: int) -> None:
        self._last_avail_idx = self._ring_index(value)

    @property
    def used_idx(self) -> int:
        """Next used idx to push."""
        return self._used_idx

    @used_idx.setter
    def used_idx(self, value: int) -> None:
        self._used_idx = self._signalled_used = self._ring_index(value)

    @property
    def event_idx(self) -> bool:
        """VIRTIO_RING_F_EVENT_IDX in use."""
        return self._event_idx

    @event_idx.setter
    def event_idx(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError("attribute value type must be bool")
        self._event_idx = value

    @staticmethod
    def _ring_index(value: object) -> int:
        v = operator.index(value)  # type: ignore[arg-type]
        if not 0 <= v <= 0xFFFF:
            raise OverflowError(f"ring index {value!r} is not in 0..65535")
        return v

    def __repr__(self) -> str:
        broken = " broken" if self._broken is not None else ""
        return (
            f"<SplitQueue size={self._size} last_avail_idx={self._last_avail_idx} "
            f"used_idx={self._used_idx}{broken}>"
        )

    # ---- common frame ----

    def _check_broken(self) -> None:
        if self._broken is not None:
            raise RingError(f"queue is broken: {self._broken}", "broken")

    @contextmanager
    def _call(self, mem: MemoryTable) -> Iterator[tuple[_Guest, list[tuple[memoryview, int]]]]:
        """Refuse a broken queue, map the rings; a guest's fault breaks the queue."""
        self._check_broken()
        with _guest(mem) as g:
            try:
                yield g, self._map(g)
            except (RingError, GuestMemoryError) as exc:
                self._broken = str(exc)
                log.error("virtqueue broken: %s", exc)
                raise

    def _map(self, g: _Guest) -> list[tuple[memoryview, int]]:
        refs = []
        n = self._size
        for what, gpa, length in (("desc table", self._desc, 16 * n),
                                  ("avail ring", self._avail, 6 + 2 * n),
                                  ("used ring", self._used, 6 + 8 * n)):  # fmt: skip
            ref = g.find(gpa, length)
            if ref is None:
                raise g.fail(what, gpa, length)
            refs.append(ref)
        return refs

    def _avail_count(self, avail: tuple[memoryview, int]) -> int:
        avail_idx = _ld16(avail, 2)
        n = (avail_idx - self._last_avail_idx) & 0xFFFF
        if n > self._size:
            raise RingError(
                f"avail idx {avail_idx} is {n} ahead of last_avail_idx {self._last_avail_idx}, "
                f"more than queue size {self._size}",
                "avail_idx",
            )
        return n

    # ---- the ring calls ----

    def pop(self, mem: MemoryTable, max_chains: int = 0) -> list[Chain]:
        """Take up to ``max_chains`` (0: all) available chains, in avail ring order."""
        max_chains = operator.index(max_chains)
        if max_chains < 0:
            raise ValueError(f"max_chains must be >= 0, not {max_chains}")
        with self._call(mem) as (g, (desc, avail, used)):
            n = self._avail_count(avail)
            # ordering: acquire after reading avail->idx, pairs with the driver's barrier
            # before its idx store (ring entries and descriptors are at least as new).
            if max_chains and max_chains < n:
                n = max_chains
            last, chains, nsegs = self._last_avail_idx, [], 0
            for k in range(n):
                if nsegs >= POP_SEGMENT_BUDGET:
                    break
                slot = (last + k) & (self._size - 1)
                head = _ld16(avail, 4 + 2 * slot)
                if head >= self._size:
                    raise RingError(
                        f"avail ring slot {slot}: head {head} >= queue size {self._size}", "head"
                    )
                chain = _walk(g, desc, self._size, head)
                nsegs += len(chain[1]) + len(chain[2])
                chains.append(chain)
            if self._event_idx:  # avail_event: kick once the driver makes last+n available
                _st16(used, 4 + 8 * self._size, last + len(chains))
            self._last_avail_idx = (last + len(chains)) & 0xFFFF
            return chains

    def push(self, mem: MemoryTable, completions: Iterable[tuple[int, int]]) -> None:
        """Publish ``(head, written_len)`` pairs in the used ring, then used->idx once."""
        self._check_broken()
        items = tuple(completions)
        if len(items) > self._size:
            raise ValueError(f"push of {len(items)} completions exceeds queue size {self._size}")
        elems = [_completion(k, item, self._size) for k, item in enumerate(items)]
        with self._call(mem) as (_g, (_desc, _avail, used)):
            if not elems:
                return
            for k, (head, written) in enumerate(elems):
                slot = (self._used_idx + k) & (self._size - 1)
                USED_ELEM.pack_into(used[0], used[1] + 4 + 8 * slot, head, written)
            # ordering: release, the driver must see the used elements before the idx.
            _st16(used, 2, self._used_idx + len(elems))
            self._used_idx = (self._used_idx + len(elems)) & 0xFFFF

    def pop_batch(self, mem: MemoryTable, max_chains: int = 0) -> tuple[bytes, bytes]:
        """:meth:`pop` as two flat records, ``(chains, segments)`` (``BATCH_CHAIN`` and
        ``BATCH_SEGMENT`` entries): a batch costs no Python object per chain or buffer."""
        chains = self.pop(mem, max_chains)
        crec = bytearray(BATCH_CHAIN.size * len(chains))
        flat: list[Segment] = []
        for k, (head, readable, writable) in enumerate(chains):
            BATCH_CHAIN.pack_into(crec, BATCH_CHAIN.size * k, head, len(readable),
                                  len(writable), len(flat))  # fmt: skip
            flat += readable + writable
        srec = bytearray(BATCH_SEGMENT.size * len(flat))
        for i, (gpa, length) in enumerate(flat):
            BATCH_SEGMENT.pack_into(srec, BATCH_SEGMENT.size * i, gpa, length)
        return bytes(crec), bytes(srec)

    def push_batch(self, mem: MemoryTable, used: bytes | bytearray | memoryview) -> None:
        """:meth:`push` from one buffer of ``USED_ELEM`` entries (u32 head, u32 length)."""
        self._check_broken()
        view = memoryview(used)
        if not view.c_contiguous:
            raise BufferError("push_batch: the used buffer is not C-contiguous")
        raw = view.tobytes()
        if len(raw) % USED_ELEM.size:
            raise ValueError(
                f"push_batch: {len(raw)} bytes is not a whole number of 8-byte used entries"
            )
        self.push(mem, list(USED_ELEM.iter_unpack(raw)))

    def should_notify(self, mem: MemoryTable) -> bool:
        """Must the driver be signalled for the used entries pushed since the last call?"""
        with self._call(mem) as (_g, (_desc, avail, _used)):
            old, new = self._signalled_used, self._used_idx
            # ordering: full barrier, our used->idx store must be visible before we read the
            # driver's flags/used_event (store->load), or both sides can miss the update.
            self._signalled_used = new
            if self._event_idx:  # vring_need_event(used_event, new, old)
                used_event = _ld16(avail, 4 + 2 * self._size)
                return (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF
            return new != old and not _ld16(avail, 0) & AVAIL_F_NO_INTERRUPT

    def set_notification(self, mem: MemoryTable, enable: bool) -> None:
        """Ask the driver for kicks (or not): used->flags, or avail_event with event_idx.

        With event_idx, disabling writes nothing (as Linux vhost): pop() keeps avail_event
        current. After enabling, call pending() again to close the missed-kick window.
        """
        enable = bool(enable)
        with self._call(mem) as (_g, (_desc, _avail, used)):
            if not self._event_idx:
                flags = _ld16(used, 0)
                _st16(used, 0, flags & ~USED_F_NO_NOTIFY if enable else flags | USED_F_NO_NOTIFY)
            elif enable:
                _st16(used, 4 + 8 * self._size, self._last_avail_idx)  # avail_event
            # ordering: full barrier after enabling, publish it before avail->idx is re-read.

    def pending(self, mem: MemoryTable) -> int:
        """Number of chains the driver has made available and pop() has not taken."""
        with self._call(mem) as (_g, (_desc, avail, _used)):
            return self._avail_count(avail)


def _completion(k: int, item: Any, size: int) -> tuple[int, int]:
    pair = tuple(item)
    if len(pair) != 2:
        raise TypeError("a completion must be a (head, len) pair")
    fields = []
    for value, name, limit in ((pair[0], "head", size - 1),
                               (pair[1], "written length", 0xFFFFFFFF)):  # fmt: skip
        v = operator.index(value)
        if not 0 <= v <= limit:
            raise ValueError(f"completion {k}: {name} out of range 0..{limit}")
        fields.append(v)
    return fields[0], fields[1]


def _walk(g: _Guest, desc: tuple[memoryview, int], size: int, head: int) -> Chain:
    """Follow one chain from ``head`` through NEXT and INDIRECT, checking every rule."""
    table, limit, count, i = desc, size, 0, head
    indirect = False
    total = 0
    readable: list[Segment] = []
    writable: list[Segment] = []
    while True:
        kind = "indirect descriptor" if indirect else "descriptor"
        where = f"chain {head}: {kind} {i}"
        count += 1
        if count > limit:
            raise RingError(
                f"chain {head}: more than {limit} descriptors in the "
                f"{'indirect' if indirect else 'desc'} table (loop)",
                "loop",
            )
        # Decode one copy of the descriptor: the guest may rewrite the original meanwhile.
        addr, length, flags, nxt = DESC.unpack_from(table[0], table[1] + 16 * i)
        if flags & DESC_F_INDIRECT:
            if indirect:
                raise RingError(f"{where}: indirect table inside an indirect table",
                                "indirect_nested")  # fmt: skip
            if flags & DESC_F_NEXT:
                raise RingError(f"{where}: INDIRECT combined with NEXT", "indirect_next")
            if length == 0 or length % 16 or length > 16 * MAX_INDIRECT:
                raise RingError(
                    f"{where}: indirect table length {length} is not a non-zero multiple of "
                    f"16 up to {16 * MAX_INDIRECT}",
                    "indirect_len",
                )
            ref = g.find(addr, length)
            if ref is None:
                raise g.fail(f"{where}: indirect table", addr, length)
            table, limit, count, i, indirect = ref, length // 16, 0, 0, True
            continue
        if length == 0:
            raise RingError(f"{where}: length 0", "zero_len")
        if not flags & DESC_F_WRITE and writable:
            raise RingError(f"{where}: device-readable after device-writable",
                            "write_before_read")  # fmt: skip
        if g.find(addr, length) is None:
            raise g.fail(f"{where}: buffer", addr, length)
        total += length
        if total > 0xFFFFFFFF:
            raise RingError(f"{where}: chain length {total} >= 2^32", "chain_len")
        (writable if flags & DESC_F_WRITE else readable).append((addr, length))
        if not flags & DESC_F_NEXT:
            return head, readable, writable
        if nxt >= limit:
            raise RingError(f"{where}: next {nxt} >= table size {limit}", "next")
        i = nxt


def walk_chain(mem: MemoryTable, size: int, desc: int, head: int) -> Chain:
    """Re-read the chain at ``head`` of the table at ``desc`` (not through the avail ring).

    For resubmitting chains a previous back-end took but never completed (vhost-user
    inflight tracking); the same rules as :meth:`SplitQueue.pop` apply.
    """
    with _guest(mem) as g:
        ref = g.find(desc, 16 * size)
        if ref is None:
            raise g.fail("desc table", desc, 16 * size)
        if not 0 <= head < size:
            raise RingError(f"resubmitted head {head} >= queue size {size}", "head")
        return _walk(g, ref, size, head)
