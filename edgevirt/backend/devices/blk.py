"""virtio-blk (virtio spec 5.2) over a raw image file or block device.

Requests are checked strictly against the layout the spec gives each type (header, data,
status byte); a request the device can answer gets a status byte (IOERR for a malformed or
out-of-range request, UNSUPP for an unknown type or flag), only a chain with no room for a
status byte or a short header breaks the queue, because there is no way to answer it.

Cache modes (``cache=``): ``writeback`` reads and writes through the page cache, served by
the synchronous C path (``SplitQueue.serve_blk``: a page-cache hit is faster than any
submission); ``none`` opens the image with ``O_DIRECT`` and serves reads, writes and flushes
asynchronously (``BlkAio``: io_uring, or a thread pool where io_uring is unavailable), one
engine per queue. ``blk_size`` then advertises the file's direct-I/O alignment, so a Linux
driver sends aligned requests; a buffer that is not aligned anyway is bounced (counted).
``aio=`` picks the engine: ``auto`` (default), ``io_uring``, ``threads`` or ``sync``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from edgevirt.backend.devices.base import Chain, Segment, VirtioDevice, gather, scatter, views
from edgevirt.backend.memory import GuestMemory
from edgevirt.errors import BackendError, ConfigError

log = logging.getLogger(__name__)

SECTOR = 512
REQ_HEADER = struct.Struct("<IIQ")  # type, reserved, sector
#: struct virtio_blk_discard_write_zeroes: sector, num_sectors, flags
DWZ_SEGMENT = struct.Struct("<QII")
DWZ_F_UNMAP = 1

T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
TYPE_NAMES = {
    T_IN: "read",
    T_OUT: "write",
    T_FLUSH: "flush",
    T_GET_ID: "get_id",
    T_DISCARD: "discard",
    T_WRITE_ZEROES: "write_zeroes",
}
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
ID_BYTES = 20

F_SEG_MAX = 2
F_RO = 5
F_BLK_SIZE = 6
F_FLUSH = 9
F_MQ = 12
F_DISCARD = 13
F_WRITE_ZEROES = 14

#: struct virtio_blk_config through write_zeroes_may_unmap (+3 bytes padding) = 60 bytes:
#: capacity, size_max, seg_max, geometry (cylinders, heads, sectors), blk_size,
#: topology (physical_block_exp, alignment_offset, min_io_size, opt_io_size), writeback,
#: unused0, num_queues, max_discard_sectors, max_discard_seg, discard_sector_alignment,
#: max_write_zeroes_sectors, max_write_zeroes_seg, write_zeroes_may_unmap, unused1[3].
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
CONFIG_SIZE = CONFIG.size
assert CONFIG_SIZE == 60

#: Largest discard/write-zeroes request (sectors) and segment count we advertise.
MAX_DWZ_SECTORS = 1 << 22  # 2 GiB: bounds the time one request holds the loop
MAX_DWZ_SEG = 1

# fallocate(2) modes and block-device ioctls (linux/falloc.h, linux/fs.h).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class FastPathResult(Protocol):
    """The counters of ``SplitQueue.serve_blk``'s result that the device keeps."""

    @property
    def reads(self) -> int: ...

    @property
    def writes(self) -> int: ...

    @property
    def flushes(self) -> int: ...

    @property
    def errors(self) -> int: ...

    @property
    def bytes_read(self) -> int: ...

    @property
    def bytes_written(self) -> int: ...

    @property
    def error(self) -> str | None: ...

    @property
    def bounced(self) -> int: ...


CACHE_MODES = ("writeback", "none")
AIO_MODES = ("auto", "io_uring", "threads", "sync")


def dio_alignment(fd: int) -> tuple[int, int]:
    """(buffer, offset) alignment for O_DIRECT on ``fd``: the smallest of 512..4096 that a
    read at that offset into a buffer of that alignment accepts (statx's STATX_DIOALIGN needs
    Python 3.12). Buffers follow the same rule: newer kernels accept some less aligned
    buffers, but not every layout (measured here: a 4 KiB buffer at a 64-byte offset got
    EINVAL through io_uring where a 512-byte one inside a page passed), and a guest's
    request must never fail for how its pages happen to lie, so those are bounced."""
    buf = mmap.mmap(-1, 2 * 4096)  # page aligned
    view = memoryview(buf)
    try:
        for align in (512, 1024, 2048):
            try:
                os.preadv(fd, [view[align : 2 * align]], align)
                return align, align
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
        return 4096, 4096
    finally:
        view.release()
        buf.close()


@dataclass
class Request:
    """A parsed request: its type and sector, and the data segments between header and status."""

    type: int
    sector: int
    data_out: list[memoryview]  # device-readable data after the header
    data_in: list[memoryview]  # device-writable data before the status byte
    status: memoryview


class BlockDevice(VirtioDevice):
    name = "blk"
    device_id = 2

    def __init__(
        self,
        path: str,
        *,
        readonly: bool = False,
        num_queues: int = 1,
        serial: str = "edgevirt",
        seg_max: int = 126,
        discard: bool = True,
        cache: str = "writeback",
        aio: str = "auto",
    ) -> None:
        super().__init__()
        if cache not in CACHE_MODES:
            raise ConfigError(f"blk {path}: cache={cache}, expected none or writeback")
        if aio not in AIO_MODES:
            raise ConfigError(f"blk {path}: aio={aio}, expected {', '.join(AIO_MODES)}")
        if not 1 <= num_queues <= 64:
            raise ConfigError(f"blk {path}: queues={num_queues}, expected 1..64")
        if not 1 <= seg_max <= 1024:
            raise ConfigError(f"blk {path}: seg_max={seg_max}, expected 1..1024")
        self.path = path
        self.readonly = readonly
        self.num_queues = num_queues
        self.serial = serial.encode()[:ID_BYTES]
        self.seg_max = seg_max
        self.cache = cache
        self.direct = cache == "none"
        #: the engine asked for: writeback defaults to the synchronous C path
        self.aio = "sync" if aio == "auto" and not self.direct else aio
        flags = os.O_RDONLY if readonly else os.O_RDWR
        try:
            self.fd = os.open(path, flags)
        except OSError as e:
            raise BackendError(f"blk: cannot open {path}: {e.strerror}") from e
        #: O_DIRECT fd for the C paths; self.fd (page cache) serves handle() and requests
        #: whose offset the direct fd cannot address.
        self.fd_direct = -1
        self.blk_size = SECTOR
        self.mem_align = 1
        if self.direct:
            try:
                self.fd_direct = os.open(path, flags | os.O_DIRECT)
                self.mem_align, self.blk_size = dio_alignment(self.fd_direct)
            except OSError as e:
                self.close()
                raise BackendError(
                    f"blk: cache=none: {path} does not support O_DIRECT ({e.strerror}); "
                    "tmpfs does not, use cache=writeback there"
                ) from e
        st = os.fstat(self.fd)
        self.is_blockdev = stat.S_ISBLK(st.st_mode)
        size = os.lseek(self.fd, 0, os.SEEK_END) if self.is_blockdev else st.st_size
        if size % SECTOR:
            self.close()
            raise BackendError(f"blk: {path} is {size} bytes, not a multiple of {SECTOR}")
        self.capacity = size // SECTOR
        self.features = 1 << F_SEG_MAX | 1 << F_BLK_SIZE | 1 << F_FLUSH
        if readonly:
            self.features |= 1 << F_RO
        elif discard:
            self.features |= 1 << F_DISCARD | 1 << F_WRITE_ZEROES
        if num_queues > 1:
            self.features |= 1 << F_MQ

    def config(self) -> bytes:
        dwz = self.features >> F_DISCARD & 1
        return CONFIG.pack(
            self.capacity,
            0,  # size_max: not offered
            self.seg_max,
            0, 0, 0,  # geometry: not offered
            self.blk_size,  # blk_size: the direct-I/O alignment with cache=none
            0, 0, 0, 0,  # topology: not offered
            0, 0,  # writeback, unused0
            self.num_queues,
            MAX_DWZ_SECTORS * dwz,
            MAX_DWZ_SEG * dwz,
            1 * dwz,  # discard_sector_alignment, in sectors
            MAX_DWZ_SECTORS * dwz,
            MAX_DWZ_SEG * dwz,
            1 * dwz,  # write_zeroes_may_unmap
        )  # fmt: skip

    def close(self) -> None:
        for name in ("fd", "fd_direct"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    # -- the request path ---------------------------------------------------------------

    def handle(self, queue: int, chain: Chain, mem: GuestMemory) -> int:
        self.stats.requests += 1
        req = self.parse(chain, mem)
        key = TYPE_NAMES.get(req.type, "other")
        self.stats.by_type[key] = self.stats.by_type.get(key, 0) + 1
        written = 0
        try:
            status, written = self._serve(req)
        except OSError as e:
            log.error("blk %s: %s at sector %d: %s", self.path, key, req.sector, e)
            status = S_IOERR
        if status != S_OK:
            self.stats.errors += 1
        req.status[0] = status
        return written + 1

    def fast_path_args(self) -> tuple[int, int, int, bool] | None:
        """(fd, capacity, seg_max, readonly) for ``SplitQueue.serve_blk``, the C request path
        of reads, writes and flushes; it hands every other chain back to :meth:`handle`.
        None when closed or when the queues use :meth:`open_aio` instead. With cache=none
        the fd is the O_DIRECT one and :attr:`fallback_fd` serves what it refuses."""
        return self.sync_args() if self.aio == "sync" else None

    def sync_args(self) -> tuple[int, int, int, bool] | None:
        """As :meth:`fast_path_args` whatever the ``aio`` mode: virtio-msg serves a queue
        that has no engine (``aio=sync``, or none could be opened) with it."""
        if self.fd < 0:
            return None
        fd = self.fd_direct if self.direct else self.fd
        return fd, self.capacity, self.seg_max, self.readonly

    @property
    def fallback_fd(self) -> int:
        """The page-cache fd for requests O_DIRECT refuses (cache=none), else -1."""
        return self.fd if self.direct else -1

    def open_aio(self, depth: int, aio_type: Any) -> Any:
        """A ``BlkAio`` engine for one queue of ``depth`` entries, or None for the synchronous
        path (``aio=sync``, closed). ``aio_type`` is ``_ring.BlkAio``."""
        if self.fd < 0 or self.aio == "sync":
            return None
        fd = self.fd_direct if self.direct else self.fd
        return aio_type(fd, self.capacity, self.seg_max, self.readonly, depth,
                        engine=self.aio, direct=self.direct, align=self.blk_size,
                        mem_align=self.mem_align, fd_buffered=self.fd)  # fmt: skip

    def account(self, res: FastPathResult) -> None:
        """Add what ``serve_blk`` or ``BlkAio`` served to the stats; log its first failure."""
        served = res.reads + res.writes + res.flushes
        if not (served or res.errors or res.bytes_read or res.bytes_written or res.bounced):
            return
        self.stats.requests += served
        if res.bounced:
            self.stats.by_type["bounced"] = self.stats.by_type.get("bounced", 0) + res.bounced
        by_type = self.stats.by_type
        for key, n in (("read", res.reads), ("write", res.writes), ("flush", res.flushes)):
            if n:
                by_type[key] = by_type.get(key, 0) + n
        self.stats.errors += res.errors
        self.stats.bytes_read += res.bytes_read
        self.stats.bytes_written += res.bytes_written
        if res.error is not None:
            log.error("blk %s: %s (%d failed request(s) in this batch)", self.path, res.error,
                      res.errors)  # fmt: skip

    def parse(self, chain: Chain, mem: GuestMemory) -> Request:
        """Split a chain into header, data and status; BackendError if it cannot be answered."""
        if not chain.writable:
            raise BackendError(f"blk: chain {chain.head} has no device-writable status byte")
        readable_len = _total(chain.readable)
        if readable_len < REQ_HEADER.size:
            raise BackendError(
                f"blk: chain {chain.head} header is {readable_len} bytes, "
                f"expected {REQ_HEADER.size}"
            )
        status_gpa, status_len = chain.writable[-1]
        status = mem.translate(status_gpa + status_len - 1, 1)
        rtype, _, sector = REQ_HEADER.unpack(gather(mem, chain.readable, REQ_HEADER.size))
        return Request(
            rtype,
            sector,
            views(mem, chain.readable, skip=REQ_HEADER.size),
            views(mem, chain.writable, drop_tail=1),
            status,
        )

    def _serve(self, req: Request) -> tuple[int, int]:
        """(status, bytes written into data_in)."""
        out_len = sum(len(b) for b in req.data_out)
        in_len = sum(len(b) for b in req.data_in)
        t = req.type
        if t == T_IN:
            if out_len or not self._data_ok(req, req.data_in, in_len):
                return S_IOERR, 0
            n = os.preadv(self.fd, req.data_in, req.sector * SECTOR)
            if n != in_len:  # short read at the end of a shrinking file: never leak stale data
                skip = n
                for b in req.data_in:
                    if skip < len(b):
                        b[skip:] = bytes(len(b) - skip)
                    skip = max(0, skip - len(b))
            self.stats.bytes_written += in_len
            return S_OK, in_len
        if t == T_OUT:
            if in_len or not self._data_ok(req, req.data_out, out_len):
                return S_IOERR, 0
            if self.readonly:
                return S_IOERR, 0
            if os.pwritev(self.fd, req.data_out, req.sector * SECTOR) != out_len:
                return S_IOERR, 0
            self.stats.bytes_read += out_len
            return S_OK, 0
        if t == T_FLUSH:
            if out_len or in_len:
                return S_IOERR, 0
            if not self.readonly:
                os.fdatasync(self.fd)
            return S_OK, 0
        if t == T_GET_ID:
            if out_len or in_len < ID_BYTES:
                return S_IOERR, 0
            return S_OK, scatter(req.data_in, self.serial.ljust(ID_BYTES, b"\0"))
        if t in (T_DISCARD, T_WRITE_ZEROES) and self.features >> F_DISCARD & 1:
            return self._discard_write_zeroes(req, out_len, in_len), 0
        return S_UNSUPP, 0

    def _data_ok(self, req: Request, bufs: Sequence[memoryview], length: int) -> bool:
        if len(bufs) > self.seg_max:
            log.error("blk %s: %d data segments, seg_max is %d", self.path, len(bufs), self.seg_max)
            return False
        return self._in_range(req.sector, length // SECTOR, length % SECTOR)

    def _in_range(self, sector: int, sectors: int, remainder: int = 0) -> bool:
        if remainder or sector > self.capacity or sectors > self.capacity - sector:
            log.error(
                "blk %s: request sector %d + %d sectors (+%d bytes) beyond capacity %d sectors",
                self.path,
                sector,
                sectors,
                remainder,
                self.capacity,
            )
            return False
        return True

    def _discard_write_zeroes(self, req: Request, out_len: int, in_len: int) -> int:
        if in_len or out_len == 0 or out_len % DWZ_SEGMENT.size:
            return S_IOERR
        raw = b"".join(bytes(b) for b in req.data_out)
        segs = [DWZ_SEGMENT.unpack_from(raw, i) for i in range(0, len(raw), DWZ_SEGMENT.size)]
        if len(segs) > MAX_DWZ_SEG:
            return S_IOERR
        for sector, num, flags in segs:
            if flags & ~DWZ_F_UNMAP or (req.type == T_DISCARD and flags & DWZ_F_UNMAP):
                return S_UNSUPP  # spec 5.2.6.2: unknown flags, or unmap on a discard
            if num > MAX_DWZ_SECTORS or not self._in_range(sector, num):
                return S_IOERR
        if self.readonly:
            return S_IOERR
        for sector, num, flags in segs:
            if req.type == T_DISCARD:
                self._discard(sector * SECTOR, num * SECTOR)
            else:
                self._write_zeroes(sector * SECTOR, num * SECTOR, bool(flags & DWZ_F_UNMAP))
            self.stats.bytes_read += num * SECTOR
        return S_OK

    def _discard(self, offset: int, length: int) -> None:
        """Discard is a hint (spec): a host that cannot deallocate still answers OK."""
        try:
            if self.is_blockdev:
                fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("<QQ", offset, length))
            else:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise

    def _write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """The range must read back as zeros afterwards, whatever the host supports."""
        try:
            if self.is_blockdev:
                fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("<QQ", offset, length))
            else:
                mode = FALLOC_FL_PUNCH_HOLE if unmap else FALLOC_FL_ZERO_RANGE
                fallocate(self.fd, mode | FALLOC_FL_KEEP_SIZE, offset, length)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise
        zeros = bytes(min(length, 1 << 20))
        pos = 0
        while pos < length:
            n = os.pwrite(self.fd, zeros[: length - pos], offset + pos)
            if n <= 0:
                raise OSError(errno.EIO, "short write while zeroing")
            pos += n


def _total(segs: Sequence[Segment]) -> int:
    return sum(n for _, n in segs)
