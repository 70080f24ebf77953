"""Guest memory as the back-end sees it: only the regions it was given (the carve-out).

Every guest address the back-end touches goes through :meth:`GuestMemory.translate`, which
checks bounds with overflow-safe arithmetic. Refused accesses are counted, because a
refused access is how a misconfigured or hostile guest shows up in the statistics.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import stat
import struct
from dataclasses import dataclass, field
from typing import Literal

from edgevirt.errors import GuestMemoryError

try:  # the C safety net for files that cannot be sealed (setup.py builds it)
    import edgevirt.backend._sigbus as _sigbus
except ImportError:  # pragma: no cover - only where the extension was not built
    _sigbus = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


@dataclass
class Region:
    """One contiguous window of guest-physical memory mapped into this process."""

    gpa: int  # guest-physical address of the first byte
    size: int
    buf: mmap.mmap | bytearray  # writable mapping of exactly ``size`` bytes
    uva: int = 0  # the front-end VMM's user address for the same byte (vhost-user)
    #: Why the file behind the mapping could still shrink under it (``None``: it cannot, or
    #: no file); a shrunk file turns the vanished pages into SIGBUS on touch.
    unsealed: str | None = None
    #: Slot of an unsealed mapping in the SIGBUS safety net (``_sigbus``), else -1.
    guard: int = -1

    @property
    def vanished_pages(self) -> int:
        """Pages of an unsealed file that shrank under the mapping (now zeros here)."""
        return _sigbus.pages(self.guard) if self.guard >= 0 and _sigbus is not None else 0

    def close(self) -> None:
        self._unguard()
        if isinstance(self.buf, mmap.mmap):
            self.buf.close()

    def _unguard(self) -> None:
        if self.guard >= 0 and _sigbus is not None:
            _sigbus.unguard(self.guard)  # before the range can be mapped again
            self.guard = -1

    def __del__(self) -> None:  # dropped without close(): the mapping goes with us
        self._unguard()

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def describe(self) -> str:
        return f"[{self.gpa:#x}, {self.end:#x})"


@dataclass
class GuestMemory:
    """The set of mapped regions. ``table`` is what the ring code (C or Python) reads."""

    regions: list[Region] = field(default_factory=list)
    refused: int = 0
    #: ``table``, built once per change of ``regions`` (every ring call reads it); change
    #: ``regions`` only through add/remove/close, which drop it.
    _table: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def table(self) -> tuple[tuple[int, mmap.mmap | bytearray], ...]:
        if self._table is None:
            self._table = tuple((r.gpa, r.buf) for r in self.regions)
        return self._table

    @property
    def mapped_bytes(self) -> int:
        return sum(r.size for r in self.regions)

    @property
    def vanished_pages(self) -> int:
        return sum(r.vanished_pages for r in self.regions)

    def describe(self) -> str:
        return ", ".join(r.describe() for r in self.regions) or "nothing mapped"

    def add(self, region: Region) -> None:
        for r in self.regions:
            if region.gpa < r.end and r.gpa < region.end:
                raise GuestMemoryError(
                    f"region {region.describe()} overlaps mapped region {r.describe()}"
                )
        self.regions.append(region)
        self.regions.sort(key=lambda r: r.gpa)
        self._table = None

    def add_file(self, fd: int, gpa: int, size: int, offset: int = 0, uva: int = 0) -> Region:
        """Map ``size`` bytes of ``fd`` at ``offset`` as guest-physical ``gpa``."""
        page = mmap.ALLOCATIONGRANULARITY
        if offset % page:
            raise GuestMemoryError(f"mmap offset {offset:#x} is not page aligned ({page:#x})")
        if size <= 0:
            raise GuestMemoryError(f"region at {gpa:#x} has size {size:#x}, expected > 0")
        where = f"region at {gpa:#x} ({size:#x} bytes at file offset {offset:#x})"
        unsealed = seal_against_shrinking(fd)  # before the size check: no window between
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise GuestMemoryError(f"{where}: bad fd: {e.strerror}") from e
        # A mapping past the end of the file would fault (SIGBUS) on first touch.
        if stat.S_ISREG(st.st_mode) and offset + size > st.st_size:
            raise GuestMemoryError(
                f"{where}: goes past the end of the {st.st_size:#x}-byte file it maps"
            )
        try:
            buf = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, offset=offset)
        except (OSError, ValueError, OverflowError) as e:
            raise GuestMemoryError(f"{where}: cannot map: {e}") from e
        region = Region(gpa=gpa, size=size, buf=buf, uva=uva, unsealed=unsealed)
        if unsealed and _sigbus is not None:
            # The file may still shrink: its vanished pages become zeros, not SIGBUS.
            try:
                region.guard = _sigbus.guard(buf)
            except OverflowError as e:  # every slot taken: served as before the net existed
                log.warning("%s: no SIGBUS safety net for this mapping: %s", where, e)
        try:
            self.add(region)
        except GuestMemoryError:
            region.close()
            raise
        return region

    def remove(self, gpa: int) -> None:
        for r in self.regions:
            if r.gpa == gpa:
                self.regions.remove(r)
                self._table = None
                r.close()
                return
        raise GuestMemoryError(f"no mapped region starts at {gpa:#x}")

    def close(self) -> None:
        for r in self.regions:
            r.close()
        self.regions.clear()
        self._table = None

    def _find(self, gpa: int, length: int) -> Region | None:
        if gpa < 0 or length < 0:
            return None
        for r in self.regions:
            # gpa - r.gpa cannot overflow in Python; written as offsets to mirror the C code.
            if r.gpa <= gpa and gpa - r.gpa <= r.size and length <= r.size - (gpa - r.gpa):
                return r
        return None

    def translate(self, gpa: int, length: int) -> memoryview:
        """Return a writable view of ``[gpa, gpa+length)`` or raise GuestMemoryError."""
        r = self._find(gpa, length)
        if r is None:
            self.refused += 1
            msg = (
                f"guest access [{gpa:#x}, +{length:#x}) lies outside the carve-out "
                f"({self.describe()})"
            )
            log.error("%s", msg)
            raise GuestMemoryError(msg)
        off = gpa - r.gpa
        return memoryview(r.buf)[off : off + length]

    def uva_to_gpa(self, uva: int, length: int) -> int:
        """vhost-user ring addresses arrive as the VMM's user addresses: map them back."""
        for r in self.regions:
            if r.uva <= uva and uva - r.uva <= r.size and length <= r.size - (uva - r.uva):
                return r.gpa + (uva - r.uva)
        self.refused += 1
        windows = ", ".join(
            f"uva [{r.uva:#x}, {r.uva + r.size:#x}) = gpa {r.describe()}" for r in self.regions
        )
        raise GuestMemoryError(
            f"ring address uva {uva:#x} (+{length:#x}) lies outside the carve-out "
            f"({windows or 'nothing mapped'})"
        )


def store(
    buf: memoryview | mmap.mmap | bytearray,
    offset: int,
    fmt: Literal["B", "H", "I", "Q"],
    value: int,
) -> None:
    """One aligned store of a native ``fmt`` ("B", "H", "I" or "Q") word into memory a peer
    reads at the same time (ring indices, event words, the inflight region).

    ``struct.pack_into`` must not be used there: CPython zeroes the field first and then
    writes it byte by byte, so a peer reading concurrently can see 0 (a driver or device
    then takes the ring for broken, or skips a notification). A memoryview item assignment
    is a single store of the word's size. The virtio layouts are little endian, as is every
    host this runs on (the C ring checks the same)."""
    with memoryview(buf)[offset : offset + struct.calcsize(fmt)].cast(fmt) as word:
        word[0] = value


def seal_against_shrinking(fd: int) -> str | None:
    """Make sure the file behind ``fd`` can no longer shrink; returns why not, else None.

    A peer that shrinks a file we map turns the pages past its new end into SIGBUS on our
    next touch. QEMU's memory-backend-memfd seals its memfds (F_SEAL_SHRINK|F_SEAL_GROW,
    seal=on by default); a sealable memfd without F_SEAL_SHRINK gets it added (an honest
    front-end never shrinks guest RAM: growing and punching holes stay allowed). Files that
    cannot be sealed — a memfd made with seal=off (F_SEAL_SEAL set), tmpfs files under
    /dev/shm and hugetlbfs files (memory-backend-file), regular files — are reported, not
    refused: those QEMU configurations must keep working; the caller says so in its log, and
    :meth:`GuestMemory.add_file` puts their mapping under the SIGBUS safety net (``_sigbus``:
    a vanished page reads as zeros and is counted).
    """
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as e:
        return f"the file does not support seals ({e.strerror})"
    if seals & fcntl.F_SEAL_SHRINK:
        return None
    if seals & fcntl.F_SEAL_SEAL:
        return "its seals are fixed (F_SEAL_SEAL) without F_SEAL_SHRINK"
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError as e:
        return f"adding F_SEAL_SHRINK failed ({e.strerror})"
    return None


def anonymous(gpa: int, size: int) -> Region:
    """A region backed by private anonymous memory (tests, fakes)."""
    return Region(gpa=gpa, size=size, buf=mmap.mmap(-1, size))


def memfd_region(gpa: int, size: int, name: str = "edgevirt-guest") -> tuple[int, Region]:
    """A shareable region backed by a memfd: returns (fd, region). Sealable, as QEMU's
    memory-backend-memfd makes it (seal=on): a back-end can seal it against shrinking."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    return fd, Region(gpa=gpa, size=size, buf=mmap.mmap(fd, size, flags=mmap.MAP_SHARED))
