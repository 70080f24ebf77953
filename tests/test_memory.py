"""GuestMemory: bounds, overflow and the counting of refused accesses."""

import os
import signal
import subprocess
import sys

import pytest

from edgevirt.backend.memory import GuestMemory, anonymous, memfd_region
from edgevirt.errors import GuestMemoryError

BASE = 0x5C000000
SIZE = 0x10000


@pytest.fixture
def mem():
    m = GuestMemory()
    m.add(anonymous(BASE, SIZE))
    yield m
    m.close()


def test_translate_inside(mem):
    v = mem.translate(BASE + 16, 4)
    v[:] = b"abcd"
    assert bytes(mem.translate(BASE + 16, 4)) == b"abcd"
    assert mem.refused == 0


def test_translate_last_byte_and_empty_at_end(mem):
    assert len(mem.translate(BASE + SIZE - 1, 1)) == 1
    assert len(mem.translate(BASE + SIZE, 0)) == 0


@pytest.mark.parametrize(
    "gpa,length",
    [
        (BASE - 1, 1),  # just below
        (BASE + SIZE, 1),  # just above
        (BASE + SIZE - 1, 2),  # straddles the end
        (BASE, SIZE + 1),  # too long
        (2**64 - 1, 2),  # would wrap a 64-bit sum
        (BASE, 2**64),  # absurd length
        (-1, 1),
    ],
)
def test_translate_refuses_and_names_window(mem, gpa, length):
    with pytest.raises(GuestMemoryError) as ei:
        mem.translate(gpa, length)
    assert f"{BASE:#x}" in str(ei.value) and f"{BASE + SIZE:#x}" in str(ei.value)
    assert mem.refused == 1


def test_overlapping_regions_rejected(mem):
    with pytest.raises(GuestMemoryError, match="overlaps"):
        mem.add(anonymous(BASE + SIZE - 0x1000, 0x2000))


def test_uva_to_gpa(mem):
    mem.regions[0].uva = 0x7F0000000000
    assert mem.uva_to_gpa(0x7F0000000010, 16) == BASE + 0x10
    with pytest.raises(GuestMemoryError, match="uva 0x7effffffffff"):
        mem.uva_to_gpa(0x7EFFFFFFFFFF, 16)
    assert mem.refused == 1


def test_add_file_maps_shared_memory():
    fd, region = memfd_region(0, 0x2000)
    m = GuestMemory()
    try:
        m.add_file(fd, 0x1000, 0x2000)
        m.translate(0x1000, 4)[:] = b"wxyz"
        assert bytes(region.buf[:4]) == b"wxyz"  # same pages as the other mapping
        assert m.mapped_bytes == 0x2000
    finally:
        m.close()
        region.buf.close()


def test_add_file_rejects_unaligned_offset():
    fd, region = memfd_region(0, 0x2000)
    with pytest.raises(GuestMemoryError, match="not page aligned"):
        GuestMemory().add_file(fd, 0, 0x1000, offset=12)
    region.buf.close()


def test_unsealed_region_that_shrinks_reads_zeros_and_is_counted():
    """A file that cannot be sealed (a memfd without MFD_ALLOW_SEALING) shrinks under its
    mapping: the vanished page reads as zeros (the SIGBUS safety net), the rest keeps its
    data, and the page is counted."""
    fd = os.memfd_create("unsealable", os.MFD_CLOEXEC)
    os.ftruncate(fd, 0x2000)
    os.pwrite(fd, b"a" * 0x2000, 0)
    mem = GuestMemory()
    region = mem.add_file(fd, 0x10000, 0x2000)
    assert region.unsealed and region.guard >= 0
    os.ftruncate(fd, 0x1000)
    assert bytes(mem.translate(0x10000, 4)) == b"aaaa"
    assert bytes(mem.translate(0x11000, 4)) == bytes(4)
    mem.translate(0x11000, 4)[:] = b"bbbb"  # writable too, privately
    assert mem.vanished_pages == 1
    mem.close()
    os.close(fd)


def test_sigbus_outside_guarded_mappings_still_ends_the_process():
    """The safety net covers only registered mappings: any other SIGBUS gets the action
    it would have had (here the default: the process dies of SIGBUS)."""
    code = (
        "import mmap, os\n"
        "from edgevirt.backend.memory import GuestMemory\n"
        "a = os.memfd_create('a', os.MFD_CLOEXEC); os.ftruncate(a, 4096)\n"
        "g = GuestMemory(); g.add_file(a, 0, 4096)  # installs the handler\n"
        "b = os.memfd_create('b', os.MFD_CLOEXEC); os.ftruncate(b, 8192)\n"
        "m = mmap.mmap(b, 8192); os.ftruncate(b, 0)\n"
        "m[4096]\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGBUS, (r.returncode, r.stderr[-500:])
