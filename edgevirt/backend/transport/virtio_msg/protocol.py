"""virtio-msg wire format (virtio-msg draft, ``transport-msg.tex``), declared in one place.

Every message is an 8-byte header (``type``, ``msg_id``, ``dev_num``, ``token``,
``msg_size``; little endian) and a payload. Each payload is a :class:`Layout` here: a fixed
:class:`struct.Struct` with named fields, optionally followed by a variable tail whose length
a field gives (feature blocks, config bytes, a device bitmap). :func:`decode` is the single
choke point that turns bytes into a :class:`Message`; :func:`encode` builds bytes from the
same layouts. Both enforce the draft's rules and raise :class:`VirtioMsgError` naming the
message and the numbers:

* ``msg_size`` >= 8, <= the bus maximum, and equal to header + exact payload size;
* bus messages carry ``dev_num`` 0; requests carry a non-zero ``token``, events token 0;
* a response must have a request ID (0x00-0x3F), never an event ID (0x40-0x7F);
* unknown or reserved IDs are refused, as are IDs 0x80+ (reserved; this bus defines none);
* reserved "must be zero" fields are zero; GET_DEVICES offsets/counts are multiples of 8.

Bits 2..7 of ``type`` are ignored on receive, as the draft requires, and sent as zero.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

# Re-exported: the class lives in edgevirt.errors with the other layers' errors.
from edgevirt.errors import VirtioMsgError as VirtioMsgError

HEADER = struct.Struct("<BBHHH")  # type, msg_id, dev_num, token, msg_size
TYPE_RESPONSE = 1 << 0
TYPE_BUS = 1 << 1
#: The largest message this bus carries: 8-byte header + 256 payload bytes (one slot).
MAX_MSG_SIZE = 264
#: virtio-msg transport revision this implementation speaks (the draft's only one).
REVISION = 1
#: Revision 1 allows a bus maximum between these (draft "virtio-msg revisions" table).
REVISION_1_MIN_SIZE = 44
REVISION_1_MAX_SIZE = 65536
EVENT_ID_BASE = 0x40
RESERVED_ID_BASE = 0x80

# Device status bits (virtio spec 2.1) the transport itself looks at.
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128

# BUS_MSG_EVENT_DEVICE states.
DEVICE_BUS_STATE_READY = 0x1
DEVICE_BUS_STATE_REMOVED = 0x2


class MsgId(enum.IntEnum):
    """Transport message IDs (draft "Messages IDs and issuers")."""

    GET_DEVICE_INFO = 0x02
    GET_DEVICE_FEATURES = 0x03
    SET_DRIVER_FEATURES = 0x04
    GET_CONFIG = 0x05
    SET_CONFIG = 0x06
    GET_DEVICE_STATUS = 0x07
    SET_DEVICE_STATUS = 0x08
    GET_VQUEUE = 0x09
    SET_VQUEUE = 0x0A
    RESET_VQUEUE = 0x0B
    GET_SHM = 0x0C
    EVENT_CONFIG = 0x40
    EVENT_AVAIL = 0x41
    EVENT_USED = 0x42


class BusMsgId(enum.IntEnum):
    """Bus message IDs (draft "Bus Messages")."""

    GET_DEVICES = 0x02
    PING = 0x03
    EVENT_DEVICE = 0x40


@dataclass(frozen=True)
class Layout:
    """One payload: fixed fields, then ``tail_unit`` x ``fields[tail_count]`` bytes."""

    fields: tuple[str, ...]
    fmt: str = ""
    tail_count: str | None = None
    tail_unit: int = 1  # bytes per count; negative: -N means one byte per N counted items
    mbz: tuple[str, ...] = ()  # reserved fields that must be zero
    multiple_of_8: tuple[str, ...] = ()
    struct: struct.Struct = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "struct", struct.Struct("<" + self.fmt))
        assert len(self.fields) == len(self.fmt), self.fields

    def tail_len(self, values: Mapping[str, int]) -> int:
        if self.tail_count is None:
            return 0
        n = values[self.tail_count]
        return n * self.tail_unit if self.tail_unit > 0 else n // -self.tail_unit


EMPTY = Layout(())
_CONFIG = Layout(("generation", "offset", "size"), "III", tail_count="size")
_FEATURES = Layout(("index", "num_blocks"), "II", tail_count="num_blocks", tail_unit=4)
_VQUEUE = ("index", "reserved0", "size", "reserved1", "desc", "driver", "device")

#: (bus message?, msg_id, response?) -> payload layout. This table is the wire format.
LAYOUTS: dict[tuple[bool, int, bool], Layout] = {
    (False, MsgId.GET_DEVICE_INFO, False): EMPTY,
    (False, MsgId.GET_DEVICE_INFO, True): Layout(
        (
            "device_id",
            "vendor_id",
            "num_feature_bits",
            "config_size",
            "max_virtqueues",
            "admin_vq_start",
            "admin_vq_count",
        ),
        "IIIIIHH",
    ),
    (False, MsgId.GET_DEVICE_FEATURES, False): Layout(("index", "num_blocks"), "II"),
    (False, MsgId.GET_DEVICE_FEATURES, True): _FEATURES,
    (False, MsgId.SET_DRIVER_FEATURES, False): _FEATURES,
    (False, MsgId.SET_DRIVER_FEATURES, True): EMPTY,
    (False, MsgId.GET_CONFIG, False): Layout(("offset", "size"), "II"),
    (False, MsgId.GET_CONFIG, True): _CONFIG,
    (False, MsgId.SET_CONFIG, False): _CONFIG,
    (False, MsgId.SET_CONFIG, True): _CONFIG,
    (False, MsgId.GET_DEVICE_STATUS, False): EMPTY,
    (False, MsgId.GET_DEVICE_STATUS, True): Layout(("status",), "I"),
    (False, MsgId.SET_DEVICE_STATUS, False): Layout(("status",), "I"),
    (False, MsgId.SET_DEVICE_STATUS, True): Layout(("status",), "I"),
    (False, MsgId.GET_VQUEUE, False): Layout(("index",), "I"),
    (False, MsgId.GET_VQUEUE, True): Layout(
        ("index", "max_size", "size", "reserved", "desc", "driver", "device"),
        "IIIIQQQ",
        mbz=("reserved",),
    ),
    (False, MsgId.SET_VQUEUE, False): Layout(_VQUEUE, "IIIIQQQ", mbz=("reserved0", "reserved1")),
    (False, MsgId.SET_VQUEUE, True): EMPTY,
    (False, MsgId.RESET_VQUEUE, False): Layout(("index",), "I"),
    (False, MsgId.RESET_VQUEUE, True): EMPTY,
    (False, MsgId.GET_SHM, False): Layout(("index",), "I"),
    (False, MsgId.GET_SHM, True): Layout(("index", "length", "address"), "III"),
    (False, MsgId.EVENT_CONFIG, False): Layout(
        ("status", "generation", "offset", "size"), "IIII", tail_count="size"
    ),
    (False, MsgId.EVENT_AVAIL, False): Layout(("index", "next"), "II"),
    (False, MsgId.EVENT_USED, False): Layout(("index",), "I"),
    (True, BusMsgId.GET_DEVICES, False): Layout(
        ("offset", "count"), "HH", multiple_of_8=("offset", "count")
    ),
    (True, BusMsgId.GET_DEVICES, True): Layout(
        ("offset", "count", "next_offset"),
        "HHH",
        tail_count="count",
        tail_unit=-8,  # the bitmap: one bit per device number
        multiple_of_8=("offset", "count", "next_offset"),
    ),
    (True, BusMsgId.PING, False): Layout(("data",), "I"),
    (True, BusMsgId.PING, True): Layout(("data",), "I"),
    (True, BusMsgId.EVENT_DEVICE, False): Layout(("dev_num", "state"), "HH"),
}


@dataclass(frozen=True)
class Message:
    """A decoded (or to-be-encoded) message; ``fields`` follow its :data:`LAYOUTS` entry."""

    msg_id: int
    dev_num: int = 0
    token: int = 0
    response: bool = False
    bus: bool = False
    fields: Mapping[str, int] = field(default_factory=dict)
    data: bytes = b""  # the variable tail (feature words, config bytes, device bitmap)

    @property
    def is_event(self) -> bool:
        return self.msg_id >= EVENT_ID_BASE

    @property
    def name(self) -> str:
        return message_name(self.bus, self.msg_id)

    def __getitem__(self, key: str) -> int:
        return self.fields[key]

    def describe(self) -> str:
        kind = "response" if self.response else ("event" if self.is_event else "request")
        return f"{self.name} {kind} dev {self.dev_num} token {self.token}"


def message_name(bus: bool, msg_id: int) -> str:
    enum_cls: type[enum.IntEnum] = BusMsgId if bus else MsgId
    try:
        return ("BUS_MSG_" if bus else "VIRTIO_MSG_") + enum_cls(msg_id).name
    except ValueError:
        return f"{'bus' if bus else 'transport'} message {msg_id:#04x}"


def _layout(bus: bool, msg_id: int, response: bool, what: str) -> Layout:
    name = message_name(bus, msg_id)
    if msg_id >= RESERVED_ID_BASE:
        raise VirtioMsgError(f"{what}: {name} is in the reserved range 0x80-0xff")
    if response and msg_id >= EVENT_ID_BASE:
        raise VirtioMsgError(f"{what}: {name} is an event and cannot be a response")
    layout = LAYOUTS.get((bus, msg_id, response))
    if layout is None:
        raise VirtioMsgError(f"{what}: unknown {name}")
    return layout


def _check_fields(name: str, layout: Layout, values: Mapping[str, int]) -> None:
    for f in layout.mbz:
        if values[f]:
            raise VirtioMsgError(f"{name}: reserved field {f} is {values[f]:#x}, must be zero")
    for f in layout.multiple_of_8:
        if values[f] % 8:
            raise VirtioMsgError(f"{name}: {f} {values[f]} is not a multiple of 8")


def _check_header(
    name: str, bus: bool, msg_id: int, response: bool, dev_num: int, token: int
) -> None:
    if bus and dev_num:
        raise VirtioMsgError(f"{name}: bus message with dev_num {dev_num}, must be 0")
    if msg_id >= EVENT_ID_BASE and token:
        raise VirtioMsgError(f"{name}: event with token {token}, must be 0")
    if msg_id < EVENT_ID_BASE and not token:
        raise VirtioMsgError(f"{name}: {'response' if response else 'request'} with token 0")


def decode(raw: bytes | bytearray | memoryview, max_size: int = MAX_MSG_SIZE) -> Message:
    """Parse one message from ``raw`` (a private copy: never shared memory, which the peer may
    rewrite while we look). Bytes after ``msg_size`` (slot padding) are ignored."""
    raw = bytes(raw)
    if len(raw) < HEADER.size:
        raise VirtioMsgError(f"message of {len(raw)} bytes is shorter than the 8-byte header")
    mtype, msg_id, dev_num, token, size = HEADER.unpack_from(raw)
    response, bus = bool(mtype & TYPE_RESPONSE), bool(mtype & TYPE_BUS)
    name = message_name(bus, msg_id)
    if size < HEADER.size or size > max_size:
        raise VirtioMsgError(
            f"{name}: msg_size {size} outside {HEADER.size}..{max_size} (bus maximum)"
        )
    if size > len(raw):
        raise VirtioMsgError(f"{name}: msg_size {size} but only {len(raw)} bytes present")
    layout = _layout(bus, msg_id, response, name)
    _check_header(name, bus, msg_id, response, dev_num, token)
    payload = raw[HEADER.size : size]
    fixed = layout.struct.size
    if len(payload) < fixed:
        raise VirtioMsgError(f"{name}: payload {len(payload)} bytes, expected at least {fixed}")
    values = dict(zip(layout.fields, layout.struct.unpack_from(payload), strict=True))
    want = fixed + layout.tail_len(values)
    if len(payload) != want:
        raise VirtioMsgError(
            f"{name}: payload {len(payload)} bytes, expected {want}"
            + (f" ({layout.tail_count} = {values[layout.tail_count]})" if layout.tail_count else "")
        )
    _check_fields(name, layout, values)
    return Message(msg_id, dev_num, token, response, bus, values, payload[fixed:])


def encode(msg: Message, max_size: int = MAX_MSG_SIZE) -> bytes:
    """Bytes for ``msg``; refuses what :func:`decode` would refuse."""
    layout = _layout(msg.bus, msg.msg_id, msg.response, "encode")
    _check_header(f"encode {msg.name}", msg.bus, msg.msg_id, msg.response, msg.dev_num, msg.token)
    missing = set(layout.fields) - set(msg.fields) - set(layout.mbz)
    extra = set(msg.fields) - set(layout.fields)
    if missing or extra:
        raise VirtioMsgError(
            f"encode {msg.name}: fields missing {sorted(missing)} / unknown {sorted(extra)}"
        )
    values = {f: msg.fields.get(f, 0) for f in layout.fields}
    _check_fields(msg.name, layout, values)
    if len(msg.data) != layout.tail_len(values):
        raise VirtioMsgError(
            f"encode {msg.name}: {len(msg.data)} tail bytes, expected {layout.tail_len(values)}"
        )
    try:
        payload = layout.struct.pack(*values.values()) + msg.data
    except struct.error as e:
        raise VirtioMsgError(f"encode {msg.name}: {e}") from None
    size = HEADER.size + len(payload)
    if size > max_size:
        raise VirtioMsgError(f"encode {msg.name}: {size} bytes exceed the bus maximum {max_size}")
    mtype = (TYPE_RESPONSE if msg.response else 0) | (TYPE_BUS if msg.bus else 0)
    return HEADER.pack(mtype, msg.msg_id, msg.dev_num, msg.token, size) + payload


#: The one message of the data path, whole: header + index + next (the hot path reads it
#: with this instead of :func:`decode`; anything else about it goes through decode).
EVENT_AVAIL_MSG = struct.Struct("<BBHHHII")


def event_avail(raw: bytes) -> tuple[int, int] | None:
    """(dev_num, index) if ``raw`` is a well-formed EVENT_AVAIL (what :func:`decode` would
    accept as one), else None: the caller then decodes it in full, errors and all."""
    return event_avail_at(raw, 0) if len(raw) >= EVENT_AVAIL_MSG.size else None


def event_avail_at(buf: bytes | memoryview, offset: int) -> tuple[int, int] | None:
    """:func:`event_avail` of the message at ``offset`` of ``buf`` (a slot in shared
    memory: its fields are copied out at once, so what is checked is what is used)."""
    mtype, msg_id, dev_num, token, size, index, _next = EVENT_AVAIL_MSG.unpack_from(buf, offset)
    if mtype or msg_id != MsgId.EVENT_AVAIL or token or size != EVENT_AVAIL_MSG.size:
        return None
    return dev_num, index


def request(msg_id: MsgId, dev_num: int, token: int, data: bytes = b"", **fields: int) -> Message:
    return Message(int(msg_id), dev_num, token, False, False, fields, data)


def respond(req: Message, data: bytes = b"", **fields: int) -> Message:
    """The response to ``req``: same ID, echoed ``dev_num`` and ``token``."""
    return Message(req.msg_id, req.dev_num, req.token, True, req.bus, fields, data)


def event(msg_id: MsgId, dev_num: int, data: bytes = b"", **fields: int) -> Message:
    return Message(int(msg_id), dev_num, 0, False, False, fields, data)


def features_to_words(features: int, index: int, count: int) -> bytes:
    """``count`` 32-bit feature blocks starting at block ``index`` (zeros past the end)."""
    return b"".join(
        struct.pack("<I", (features >> (32 * (index + k))) & 0xFFFFFFFF) for k in range(count)
    )


def words_to_features(data: bytes, index: int) -> int:
    """Inverse of :func:`features_to_words`: feature bits as an integer."""
    value = 0
    for k, (word,) in enumerate(struct.iter_unpack("<I", data)):
        value |= word << (32 * (index + k))
    return value
