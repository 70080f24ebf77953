"""Words a peer reads while we write them (ring indices, event words) are single stores.

``struct.pack_into`` zeroes a field before writing it byte by byte: a back-end reading a
driver's avail->idx at that instant saw 0 and broke the ring ("avail idx 0 is 64649 ahead"),
which stalled the storage benchmark's runs about once in 150. Here another process reads
the word in a tight loop while this one writes it, and must never see it go backwards.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from collections.abc import Callable

import pytest

from edgevirt.backend.memory import GuestMemory, Region, store
from edgevirt.backend.virtq.driver import DriverQueue
from edgevirt.backend.virtq.pyring import SplitQueue

BASE = 0x4000_0000
SIZE = 1 << 20
SECONDS = 0.5


def backward_reads(buf: mmap.mmap, offset: int, write: Callable[[], None]) -> int:
    """Run ``write`` for SECONDS while a forked reader watches the u16 at ``offset``; how
    many times the reader saw it step backwards (a transient 0 does; the wrap does not)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the reader: no Python objects shared beyond the mapping
        words = memoryview(buf).cast("H")
        i, prev, back = offset // 2, words[offset // 2], 0
        end = time.monotonic() + SECONDS + 0.2
        while time.monotonic() < end:
            for _ in range(5000):
                v = words[i]
                if (v - prev) & 0xFFFF > 0x8000:
                    back += 1
                prev = v
        os.write(wfd, struct.pack("<I", back))
        os._exit(0)
    os.close(wfd)
    try:
        end = time.monotonic() + SECONDS
        while time.monotonic() < end:
            write()
    finally:
        data = os.read(rfd, 4)
        os.close(rfd)
        os.waitpid(pid, 0)
    return int(struct.unpack("<I", data)[0])


@pytest.fixture
def shared() -> tuple[mmap.mmap, GuestMemory]:
    buf = mmap.mmap(-1, SIZE)  # MAP_SHARED: the forked reader sees our stores
    mem = GuestMemory()
    mem.add(Region(BASE, SIZE, buf))
    return buf, mem


def test_store_is_never_seen_half_written(shared: tuple[mmap.mmap, GuestMemory]) -> None:
    buf, _ = shared
    value = [0]

    def write() -> None:
        for _ in range(1000):
            value[0] = (value[0] + 1) & 0xFFFF
            store(buf, 2, "H", value[0])

    assert backward_reads(buf, 2, write) == 0


def test_device_used_idx_is_never_seen_going_back(shared: tuple[mmap.mmap, GuestMemory]) -> None:
    """The pure-Python ring's push (the reference the C ring is tested against)."""
    buf, mem = shared
    q = SplitQueue(16, BASE, BASE + 0x1000, BASE + 0x2000)

    def write() -> None:
        for head in range(16):
            q.push(mem, [(head, 1)])

    assert backward_reads(buf, 0x2000 + 2, write) == 0


def test_driver_avail_idx_is_never_seen_going_back(shared: tuple[mmap.mmap, GuestMemory]) -> None:
    """The package's driver (tests and benchmarks drive the real back-end with it)."""
    buf, mem = shared
    drv = DriverQueue(mem, 16, base=BASE)

    def write() -> None:
        for head in range(16):
            drv.make_available(head)

    assert backward_reads(buf, drv.avail - BASE + 2, write) == 0
