"""vhost-user wire format (QEMU docs/interop/vhost-user.rst), declared in one place.

A message is a 12-byte header (``request``, ``flags``, ``size``; little-endian u32s) and
``size`` bytes of payload. Every payload layout is a :class:`struct.Struct` here, and
:func:`decode` is the single choke point that turns bytes into fields: it checks the header
(version, size limit), the exact payload size the request expects, and raises
:class:`~edgevirt.errors.VhostUserError` naming the request and the numbers.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from edgevirt.errors import VhostUserError

HEADER = struct.Struct("<III")
VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
#: Largest payload we accept; the biggest legal one is a SET_CONFIG of 256 bytes of config.
MAX_PAYLOAD = 4096
#: VHOST_MEMORY_BASELINE_NREGIONS: SET_MEM_TABLE carries at most this many regions.
MAX_REGIONS = 8
MAX_FDS = MAX_REGIONS
MAX_CONFIG = 256

U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")  # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log (user addresses)
MEM_HEADER = struct.Struct("<II")  # nregions, padding
MEM_REGION = struct.Struct("<QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
CONFIG_HEADER = struct.Struct("<III")  # offset, size, flags
MEM_REG = struct.Struct("<Q")  # VhostUserMemRegMsg padding, then one MEM_REGION
#: VhostUserInflight: mmap_size, mmap_offset, num_queues, queue_size; the C struct is padded
#: to 24 bytes and QEMU sends and expects sizeof() = 24.
INFLIGHT = struct.Struct("<QQHH4x")
#: Memory slots we accept through ADD_MEM_REG (GET_MAX_MEM_SLOTS).
MAX_MEM_SLOTS = 32
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8

# Feature bits the transport itself owns.
F_PROTOCOL_FEATURES = 30
F_EVENT_IDX = 29
F_INDIRECT_DESC = 28
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33


class Request(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(enum.IntEnum):
    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


# Payload size each request must carry (None: variable, checked by its own decoder).
_U64_REQUESTS = {
    Request.SET_FEATURES,
    Request.SET_PROTOCOL_FEATURES,
    Request.SET_VRING_KICK,
    Request.SET_VRING_CALL,
    Request.SET_VRING_ERR,
    Request.SET_LOG_BASE,
    Request.SET_STATUS,
}
_EMPTY_REQUESTS = {
    Request.GET_FEATURES,
    Request.GET_PROTOCOL_FEATURES,
    Request.GET_QUEUE_NUM,
    Request.SET_OWNER,
    Request.RESET_OWNER,
    Request.RESET_DEVICE,
    Request.GET_MAX_MEM_SLOTS,
    Request.GET_STATUS,
}
_STATE_REQUESTS = {
    Request.SET_VRING_NUM,
    Request.SET_VRING_BASE,
    Request.GET_VRING_BASE,
    Request.SET_VRING_ENABLE,
}
#: Requests that take file descriptors, and how many (exactly).
FD_COUNT = {
    Request.SET_BACKEND_REQ_FD: 1,
    Request.SET_LOG_FD: 1,
    Request.SET_INFLIGHT_FD: 1,
    Request.ADD_MEM_REG: 1,
}


#: Requests whose fd count depends on the payload (checked by decode itself).
_FD_TAKERS = {
    Request.SET_MEM_TABLE,
    Request.SET_VRING_KICK,
    Request.SET_VRING_CALL,
    Request.SET_VRING_ERR,
    Request.REM_MEM_REG,
}


@dataclass
class Message:
    request: Request
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def u64(self) -> int:
        return int(U64.unpack(self.payload)[0])

    def state(self) -> tuple[int, int]:
        idx, num = VRING_STATE.unpack(self.payload)
        return int(idx), int(num)


@dataclass(frozen=True)
class MemRegion:
    gpa: int
    size: int
    uva: int
    offset: int


def parse_header(data: bytes) -> tuple[int, int, int]:
    """Validate the 12-byte header; returns (request, flags, size)."""
    if len(data) != HEADER.size:
        raise VhostUserError(f"short header: {len(data)} bytes, expected {HEADER.size}")
    req, flags, size = HEADER.unpack(data)
    if flags & FLAG_VERSION_MASK != VERSION:
        raise VhostUserError(
            f"request {req}: flags {flags:#x} carry version {flags & FLAG_VERSION_MASK}, "
            f"expected {VERSION}"
        )
    if flags & FLAG_REPLY:
        raise VhostUserError(f"request {req}: front-end sent a message with the REPLY flag")
    if size > MAX_PAYLOAD:
        raise VhostUserError(f"request {req}: payload size {size} exceeds limit {MAX_PAYLOAD}")
    return req, flags, size


def decode(req: int, flags: int, payload: bytes, fds: list[int]) -> Message:
    """Check the payload size and fd count for ``req``; the single parse choke point."""
    try:
        request = Request(req)
    except ValueError:
        raise VhostUserError(f"unknown request code {req} ({len(payload)} byte payload)") from None
    n = len(payload)
    expect: int | None = None
    if request in _U64_REQUESTS:
        expect = U64.size
    elif request in _EMPTY_REQUESTS:
        # QEMU sends GET_* with size 0, but some front-ends send a u64 zero: accept both.
        if n not in (0, U64.size):
            raise VhostUserError(f"{request.name}: payload {n} bytes, expected 0 or 8")
    elif request in _STATE_REQUESTS:
        expect = VRING_STATE.size
    elif request is Request.SET_VRING_ADDR:
        expect = VRING_ADDR.size
    elif request is Request.SET_MEM_TABLE:
        if n < MEM_HEADER.size:
            raise VhostUserError(f"SET_MEM_TABLE: payload {n} bytes, shorter than its header")
        count = MEM_HEADER.unpack_from(payload)[0]
        if not 1 <= count <= MAX_REGIONS:
            raise VhostUserError(f"SET_MEM_TABLE: {count} regions, expected 1..{MAX_REGIONS}")
        expect = MEM_HEADER.size + count * MEM_REGION.size
        if len(fds) != count:
            raise VhostUserError(f"SET_MEM_TABLE: {count} regions but {len(fds)} fds")
    elif request in (Request.ADD_MEM_REG, Request.REM_MEM_REG):
        expect = MEM_REG.size + MEM_REGION.size
        # QEMU 7.2 attaches the region's fd to REM_MEM_REG, later versions none.
        if request is Request.REM_MEM_REG and len(fds) > 1:
            raise VhostUserError(f"REM_MEM_REG: {len(fds)} fds attached, expected 0 or 1")
    elif request in (Request.GET_INFLIGHT_FD, Request.SET_INFLIGHT_FD):
        # 20 bytes is the packed layout some front-ends send; the fields are the same.
        if n not in (INFLIGHT.size, INFLIGHT.size - 4):
            raise VhostUserError(f"{request.name}: payload {n} bytes, expected {INFLIGHT.size}")
    elif request in (Request.GET_CONFIG, Request.SET_CONFIG):
        if n < CONFIG_HEADER.size:
            raise VhostUserError(f"{request.name}: payload {n} bytes, shorter than its header")
        off, size, _ = CONFIG_HEADER.unpack_from(payload)
        if size > MAX_CONFIG or off > MAX_CONFIG:
            raise VhostUserError(
                f"{request.name}: offset {off} size {size} beyond config limit {MAX_CONFIG}"
            )
        expect = CONFIG_HEADER.size + size
    if expect is not None and n != expect:
        raise VhostUserError(f"{request.name}: payload {n} bytes, expected {expect}")
    want_fds = FD_COUNT.get(request)
    if want_fds is not None and len(fds) != want_fds:
        raise VhostUserError(f"{request.name}: {len(fds)} fds attached, expected {want_fds}")
    if want_fds is None and request not in _FD_TAKERS and fds:
        raise VhostUserError(f"{request.name}: {len(fds)} fds attached, expected none")
    if request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
        nofd = bool(U64.unpack(payload)[0] & VRING_NOFD_MASK)
        if len(fds) != (0 if nofd else 1):
            raise VhostUserError(f"{request.name}: {len(fds)} fds attached with NOFD={int(nofd)}")
    return Message(request, flags, payload, fds)


def mem_regions(msg: Message) -> list[MemRegion]:
    count = MEM_HEADER.unpack_from(msg.payload)[0]
    out = []
    for i in range(count):
        gpa, size, uva, off = MEM_REGION.unpack_from(
            msg.payload, MEM_HEADER.size + i * MEM_REGION.size
        )
        out.append(_region(f"SET_MEM_TABLE region {i}", gpa, size, uva, off))
    return out


def _region(what: str, gpa: int, size: int, uva: int, off: int) -> MemRegion:
    if size == 0 or gpa + size > 1 << 64 or uva + size > 1 << 64 or off + size > 1 << 64:
        raise VhostUserError(
            f"{what}: gpa {gpa:#x} size {size:#x} uva {uva:#x} offset {off:#x} is empty "
            f"or wraps the address space"
        )
    return MemRegion(gpa, size, uva, off)


def mem_reg(msg: Message) -> MemRegion:
    """The one region of ADD_MEM_REG / REM_MEM_REG."""
    gpa, size, uva, off = MEM_REGION.unpack_from(msg.payload, MEM_REG.size)
    return _region(msg.request.name, gpa, size, uva, off)


def inflight(msg: Message) -> tuple[int, int, int, int]:
    """(mmap_size, mmap_offset, num_queues, queue_size) of GET/SET_INFLIGHT_FD."""
    size, off, nq, qs = INFLIGHT.unpack(msg.payload.ljust(INFLIGHT.size, b"\0"))
    return int(size), int(off), int(nq), int(qs)


def pack(request: Request, payload: bytes) -> bytes:
    """A reply from the back-end: version 1 with the REPLY flag."""
    return HEADER.pack(request, VERSION | FLAG_REPLY, len(payload)) + payload
