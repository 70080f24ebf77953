"""virtio-blk (virtio spec 5.2) over a raw image file or block device."""

from __future__ import annotations

import logging
import os
import stat
import struct

from edgevirt.backend.devices.base import Chain, VirtioDevice, gather, views
from edgevirt.backend.memory import GuestMemory
from edgevirt.errors import BackendError, GuestMemoryError

log = logging.getLogger(__name__)

SECTOR = 512
REQ_HEADER = struct.Struct("<IIQ")  # type, reserved, sector

T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
ID_BYTES = 20

F_SEG_MAX = 2
F_BLK_SIZE = 6
F_FLUSH = 9
F_MQ = 12

# struct virtio_blk_config up to num_queues (the rest reads as zero: no discard yet).
CONFIG = struct.Struct("<QIIHBBIBBHIBBH")
CONFIG_SIZE = 60


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
    ) -> None:
        super().__init__()
        self.path = path
        self.readonly = readonly
        self.num_queues = num_queues
        self.serial = serial.encode()[:ID_BYTES]
        self.seg_max = seg_max
        try:
            self.fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
        except OSError as e:
            raise BackendError(f"blk: cannot open {path}: {e.strerror}") from e
        st = os.fstat(self.fd)
        if stat.S_ISBLK(st.st_mode):
            size = os.lseek(self.fd, 0, os.SEEK_END)
        else:
            size = st.st_size
        if size % SECTOR:
            os.close(self.fd)
            raise BackendError(f"blk: {path} is {size} bytes, not a multiple of {SECTOR}")
        self.capacity = size // SECTOR
        self.features = 1 << F_SEG_MAX | 1 << F_BLK_SIZE | 1 << F_FLUSH
        if num_queues > 1:
            self.features |= 1 << F_MQ

    def config(self) -> bytes:
        raw = CONFIG.pack(
            self.capacity, 0, self.seg_max, 0, 0, 0, SECTOR, 0, 0, 0, 0, 1, 0, self.num_queues
        )
        return raw.ljust(CONFIG_SIZE, b"\0")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def handle(self, queue: int, chain: Chain, mem: GuestMemory) -> int:
        self.stats.requests += 1
        writable_len = sum(n for _, n in chain.writable)
        if writable_len < 1:
            raise BackendError(f"blk: chain {chain.head} has no status byte")
        status_gpa, status_len = chain.writable[-1]
        status_view = mem.translate(status_gpa + status_len - 1, 1)
        readable_len = sum(n for _, n in chain.readable)
        if readable_len < REQ_HEADER.size:
            raise BackendError(
                f"blk: chain {chain.head} header is {readable_len} bytes, "
                f"expected {REQ_HEADER.size}"
            )
        rtype, _, sector = REQ_HEADER.unpack(gather(mem, chain.readable, REQ_HEADER.size))
        written = 0
        try:
            status, written = self._serve(rtype, sector, chain, mem)
        except GuestMemoryError:
            raise
        except OSError as e:
            log.error("blk %s: request type %d sector %d: %s", self.path, rtype, sector, e)
            status = S_IOERR
        if status != S_OK:
            self.stats.errors += 1
        status_view[0] = status
        return written + 1

    def _serve(self, rtype: int, sector: int, chain: Chain, mem: GuestMemory) -> tuple[int, int]:
        key = {T_IN: "read", T_OUT: "write", T_FLUSH: "flush", T_GET_ID: "get_id"}.get(rtype)
        self.stats.by_type[key or "other"] = self.stats.by_type.get(key or "other", 0) + 1
        if rtype == T_IN:
            bufs = views(mem, chain.writable, drop_tail=1)
            length = sum(len(b) for b in bufs)
            if not self._in_range(sector, length):
                return S_IOERR, 0
            n = os.preadv(self.fd, bufs, sector * SECTOR)
            if n != length:
                # Short read past EOF of a growing file: zero the rest, never leak stale data.
                for b in views(mem, chain.writable, skip=n, drop_tail=1):
                    b[:] = bytes(len(b))
            self.stats.bytes_written += length
            return S_OK, length
        if rtype == T_OUT:
            if self.readonly:
                return S_IOERR, 0
            bufs = views(mem, chain.readable, skip=REQ_HEADER.size)
            length = sum(len(b) for b in bufs)
            if not self._in_range(sector, length):
                return S_IOERR, 0
            n = os.pwritev(self.fd, bufs, sector * SECTOR)
            if n != length:
                return S_IOERR, 0
            self.stats.bytes_read += length
            return S_OK, 0
        if rtype == T_FLUSH:
            os.fsync(self.fd)
            return S_OK, 0
        if rtype == T_GET_ID:
            bufs = views(mem, chain.writable, drop_tail=1)
            data = self.serial.ljust(ID_BYTES, b"\0")
            pos = 0
            for b in bufs:
                take = min(len(b), len(data) - pos)
                b[:take] = data[pos : pos + take]
                pos += take
            return S_OK, pos
        return S_UNSUPP, 0

    def _in_range(self, sector: int, length: int) -> bool:
        if length % SECTOR or sector + length // SECTOR > self.capacity:
            log.error(
                "blk %s: request sector %d + %d bytes beyond capacity %d sectors",
                self.path,
                sector,
                length,
                self.capacity,
            )
            return False
        return True
