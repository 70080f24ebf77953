"""The inflight I/O tracking region (vhost-user INFLIGHT_SHMFD, split virtqueues).

The back-end allocates it (GET_INFLIGHT_FD), the front-end keeps the fd and hands it back
after every (re)connect (SET_INFLIGHT_FD). A back-end that is killed mid-request leaves in
it which chains it had taken from the avail ring but not yet completed; the next back-end
resubmits exactly those, so a restart loses no guest I/O. Layout per queue (spec
"Inflight I/O tracking", split virtqueue), each queue region aligned to 64 bytes::

    le64 features; le16 version; le16 desc_num; le16 last_batch_head; le16 used_idx;
    desc[desc_num] = {u8 inflight; u8 padding[5]; le16 next; le64 counter}

The region comes from the front-end, not the guest, but it is still checked: a size or a
field that does not fit makes the back-end re-initialise that queue's region and log it.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from collections.abc import Callable

from edgevirt.backend.memory import store
from edgevirt.errors import VhostUserError

log = logging.getLogger(__name__)

#: VhostUserInflight: mmap_size, mmap_offset, num_queues, queue_size (C struct size: 24).
INFLIGHT_MSG = struct.Struct("<QQHH4x")
QUEUE_HEADER = struct.Struct("<QHHHH")  # features, version, desc_num, last_batch_head, used_idx
DESC_STATE = struct.Struct("<B5xHQ")  # inflight, padding[5], next, counter
INFLIGHT_ALIGN = 64
INFLIGHT_VERSION = 1
MAX_QUEUES = 64
MAX_QUEUE_SIZE = 32768
#: QEMU asks for its queue-size property (128 for vhost-user-blk), but virtio-mmio lets the
#: guest pick up to VIRTQUEUE_MAX_SIZE entries: regions are sized for at least this many.
MIN_TRACKED = 1024

_OFF_VERSION = 8
_OFF_LAST_BATCH_HEAD = 12
_OFF_USED_IDX = 14
_OFF_COUNTER = 8  # in a DESC_STATE


def queue_region_size(queue_size: int) -> int:
    raw = QUEUE_HEADER.size + DESC_STATE.size * queue_size
    return (raw + INFLIGHT_ALIGN - 1) // INFLIGHT_ALIGN * INFLIGHT_ALIGN


def check_geometry(num_queues: int, queue_size: int) -> None:
    if not 1 <= num_queues <= MAX_QUEUES:
        raise VhostUserError(f"inflight: num_queues {num_queues}, expected 1..{MAX_QUEUES}")
    if not 1 <= queue_size <= MAX_QUEUE_SIZE or queue_size & (queue_size - 1):
        raise VhostUserError(
            f"inflight: queue_size {queue_size} is not a power of two <= {MAX_QUEUE_SIZE}"
        )


def create(num_queues: int, queue_size: int) -> tuple[int, int]:
    """A zeroed region for GET_INFLIGHT_FD: returns (memfd, mmap_size); the caller owns fd.

    The layout is the back-end's to choose: each queue gets ``mmap_size / num_queues``
    bytes, enough for max(queue_size, MIN_TRACKED) descriptors.
    """
    check_geometry(num_queues, queue_size)
    size = num_queues * queue_region_size(max(queue_size, MIN_TRACKED))
    fd = os.memfd_create("edgevirt-inflight", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd, size


class InflightQueue:
    """One queue's part of the region: mark chains taken, clear them once completed."""

    def __init__(self, buf: memoryview, queue_size: int) -> None:
        self.buf = buf
        self.queue_size = queue_size
        self.counter = 0

    def _desc_off(self, head: int) -> int:
        return QUEUE_HEADER.size + DESC_STATE.size * head

    def init(self, used_idx: int) -> None:
        self.buf[:] = bytes(len(self.buf))
        QUEUE_HEADER.pack_into(self.buf, 0, 0, INFLIGHT_VERSION, self.queue_size, 0, used_idx)
        self.counter = 0

    def recover(self, used_idx: int, used_id: Callable[[int], int]) -> list[int]:
        """Heads a previous back-end took but never completed, oldest first.

        ``used_idx`` is used->idx from guest memory, ``used_id(i)`` the id of used ring entry
        ``i``. A batch published in the used ring but not yet cleared here (the back-end died
        between the two) is cleared from the used ring's own entries. A fresh or malformed
        region is (re)initialised and nothing is resubmitted.
        """
        _feat, version, desc_num, _last, old_used = QUEUE_HEADER.unpack_from(self.buf, 0)
        if version != INFLIGHT_VERSION or desc_num != self.queue_size:
            if version:
                log.warning(
                    "inflight region: version %d desc_num %d does not match queue size %d: "
                    "reinitialised, nothing resubmitted",
                    version,
                    desc_num,
                    self.queue_size,
                )
            self.init(used_idx)
            return []
        published = (used_idx - old_used) & 0xFFFF
        if published > self.queue_size:
            log.warning(
                "inflight region: used_idx %d vs ring %d differ by more than the queue size: "
                "reinitialised",
                old_used,
                used_idx,
            )
            self.init(used_idx)
            return []
        for k in range(published):
            head = used_id((old_used + k) & 0xFFFF)
            if head < self.queue_size:
                self.buf[self._desc_off(head)] = 0
        store(self.buf, _OFF_USED_IDX, "H", used_idx)
        pending = []
        for head in range(self.queue_size):
            flag, _nxt, counter = DESC_STATE.unpack_from(self.buf, self._desc_off(head))
            if flag == 1:
                pending.append((counter, head))
            elif flag:
                self.buf[self._desc_off(head)] = 0  # garbage: not a chain we took
        pending.sort()
        self.counter = pending[-1][0] + 1 if pending else 0
        return [head for _, head in pending]

    # Every store below is one word (memory.store): the region must read consistently at
    # whatever instruction the back-end is killed, and struct.pack_into would zero a field
    # (the whole header, for before_push) before writing it.

    def taken(self, head: int) -> None:
        """A chain was popped: mark it before any of its I/O starts (its order first)."""
        off = self._desc_off(head)
        store(self.buf, off + _OFF_COUNTER, "Q", self.counter)
        self.buf[off] = 1
        self.counter += 1

    def before_push(self, last_head: int) -> None:
        store(self.buf, _OFF_LAST_BATCH_HEAD, "H", last_head)

    def completed(self, heads: list[int], used_idx: int) -> None:
        """After used->idx was published: the chains are the guest's again."""
        for head in heads:
            self.buf[self._desc_off(head)] = 0
        store(self.buf, _OFF_USED_IDX, "H", used_idx)

    def in_flight(self) -> int:
        return sum(1 for h in range(self.queue_size) if self.buf[self._desc_off(h)] == 1)


class InflightRegion:
    """The mapping received with SET_INFLIGHT_FD."""

    def __init__(self, fd: int, mmap_size: int, mmap_offset: int, num_queues: int,
                 queue_size: int) -> None:  # fmt: skip
        check_geometry(num_queues, queue_size)
        need = num_queues * queue_region_size(queue_size)
        if mmap_size < need or mmap_size > num_queues * queue_region_size(MAX_QUEUE_SIZE):
            raise VhostUserError(
                f"SET_INFLIGHT_FD: mmap_size {mmap_size} does not fit {num_queues} queues of "
                f"{queue_size}..{MAX_QUEUE_SIZE} descriptors ({need} bytes at least)"
            )
        if mmap_offset % mmap.ALLOCATIONGRANULARITY:
            raise VhostUserError(f"SET_INFLIGHT_FD: mmap_offset {mmap_offset:#x} not page aligned")
        try:
            if os.fstat(fd).st_size < mmap_offset + mmap_size:
                raise VhostUserError(
                    f"SET_INFLIGHT_FD: file of {os.fstat(fd).st_size} bytes is smaller than "
                    f"offset {mmap_offset:#x} + size {mmap_size:#x}"
                )
            self.map = mmap.mmap(fd, mmap_size, flags=mmap.MAP_SHARED, offset=mmap_offset)
        except OSError as e:
            raise VhostUserError(f"SET_INFLIGHT_FD: cannot map the region: {e}") from e
        self.num_queues = num_queues
        self.size = mmap_size
        # The stride follows from the size we chose in create(), not from queue_size.
        stride = mmap_size // num_queues // INFLIGHT_ALIGN * INFLIGHT_ALIGN
        self.queue_size = (stride - QUEUE_HEADER.size) // DESC_STATE.size
        view = memoryview(self.map)
        self._views = [view[i * stride : (i + 1) * stride] for i in range(num_queues)]
        self._root = view

    def queue(self, index: int) -> InflightQueue | None:
        if index >= self.num_queues:
            return None
        return InflightQueue(self._views[index], self.queue_size)

    def close(self) -> None:
        for v in self._views:
            v.release()
        self._root.release()
        self.map.close()
