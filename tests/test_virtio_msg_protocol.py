"""virtio-msg wire format: hand-computed byte layouts from the draft's tables, and the rules
:func:`decode` enforces (tests named after the rule)."""

from __future__ import annotations

import struct

import pytest

from edgevirt.backend.transport.virtio_msg import protocol as p
from edgevirt.backend.transport.virtio_msg.protocol import BusMsgId, Message, MsgId, VirtioMsgError


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", "").replace("|", ""))


# Each case: the message, and its bytes as written out by hand from the draft's tables.
CASES = [
    (  # type 0 (transport request), id 2, dev 3, token 0x1234, size 8
        p.request(MsgId.GET_DEVICE_INFO, 3, 0x1234),
        "00 02 0300 3412 0800",
    ),
    (
        p.respond(
            p.request(MsgId.GET_DEVICE_INFO, 3, 0x1234),
            device_id=2,
            vendor_id=0x45474445,
            num_feature_bits=64,
            config_size=60,
            max_virtqueues=1,
            admin_vq_start=0,
            admin_vq_count=0,
        ),
        "01 02 0300 3412 2000 | 02000000 45444745 40000000 3c000000 01000000 0000 0000",
    ),
    (
        p.request(MsgId.GET_DEVICE_FEATURES, 0, 1, index=0, num_blocks=2),
        "00 03 0000 0100 1000 | 00000000 02000000",
    ),
    (  # bits 28, 29 in block 0; 32, 33 in block 1
        Message(
            MsgId.GET_DEVICE_FEATURES,
            0,
            1,
            True,
            False,
            {"index": 0, "num_blocks": 2},
            p.features_to_words(0x3_3000_0000, 0, 2),
        ),  # fmt: skip
        "01 03 0000 0100 1800 | 00000000 02000000 | 00000030 03000000",
    ),
    (
        p.request(MsgId.SET_DRIVER_FEATURES, 1, 2, b"\x00\x00\x00\x30", index=0, num_blocks=1),
        "00 04 0100 0200 1400 | 00000000 01000000 | 00000030",
    ),
    (
        p.request(MsgId.GET_CONFIG, 0, 3, offset=8, size=4),
        "00 05 0000 0300 1000 | 08000000 04000000",
    ),
    (
        p.respond(
            p.request(MsgId.GET_CONFIG, 0, 3), b"\xaa\xbb\xcc\xdd", generation=7, offset=8, size=4
        ),  # fmt: skip
        "01 05 0000 0300 1800 | 07000000 08000000 04000000 | aabbccdd",
    ),
    (
        p.request(MsgId.SET_CONFIG, 0, 4, b"\x01\x02", generation=7, offset=0, size=2),
        "00 06 0000 0400 1600 | 07000000 00000000 02000000 | 0102",
    ),
    (  # rejected: size 0 and no data
        p.respond(p.request(MsgId.SET_CONFIG, 0, 4), generation=8, offset=0, size=0),
        "01 06 0000 0400 1400 | 08000000 00000000 00000000",
    ),
    (p.request(MsgId.GET_DEVICE_STATUS, 2, 5), "00 07 0200 0500 0800"),
    (
        p.respond(p.request(MsgId.GET_DEVICE_STATUS, 2, 5), status=0x0F),
        "01 07 0200 0500 0c00 | 0f000000",
    ),
    (p.request(MsgId.SET_DEVICE_STATUS, 2, 6, status=3), "00 08 0200 0600 0c00 | 03000000"),
    (p.request(MsgId.GET_VQUEUE, 0, 7, index=1), "00 09 0000 0700 0c00 | 01000000"),
    (
        p.respond(
            p.request(MsgId.GET_VQUEUE, 0, 7),
            index=1,
            max_size=256,
            size=128,
            desc=0x5C000000,
            driver=0x5C000800,
            device=0x5C001000,
        ),  # fmt: skip
        "01 09 0000 0700 3000 | 01000000 00010000 80000000 00000000"
        " 0000005c00000000 0008005c00000000 0010005c00000000",
    ),
    (
        p.request(
            MsgId.SET_VQUEUE,
            1,
            8,
            index=0,
            size=256,
            desc=0x5C000000,
            driver=0x5C001000,
            device=0x5C002000,
        ),  # fmt: skip
        "00 0a 0100 0800 3000 | 00000000 00000000 00010000 00000000"
        " 0000005c00000000 0010005c00000000 0020005c00000000",
    ),
    (p.respond(p.request(MsgId.SET_VQUEUE, 1, 8)), "01 0a 0100 0800 0800"),
    (p.respond(p.request(MsgId.SET_DRIVER_FEATURES, 1, 2)), "01 04 0100 0200 0800"),
    (
        p.respond(p.request(MsgId.SET_DEVICE_STATUS, 2, 6), status=0x03),
        "01 08 0200 0600 0c00 | 03000000",
    ),
    (p.respond(p.request(MsgId.RESET_VQUEUE, 1, 9)), "01 0b 0100 0900 0800"),
    (p.request(MsgId.GET_SHM, 0, 10, index=1), "00 0c 0000 0a00 0c00 | 01000000"),
    (p.request(MsgId.RESET_VQUEUE, 1, 9, index=2), "00 0b 0100 0900 0c00 | 02000000"),
    (
        p.respond(p.request(MsgId.GET_SHM, 0, 10), index=0, length=0x1000, address=0x8000),
        "01 0c 0000 0a00 1400 | 00000000 00100000 00800000",
    ),
    (
        p.event(MsgId.EVENT_CONFIG, 4, b"\x09", status=0x0F, generation=2, offset=1, size=1),
        "00 40 0400 0000 1900 | 0f000000 02000000 01000000 01000000 | 09",
    ),
    (  # next offset 5, wrap bit (the MSB) set
        p.event(MsgId.EVENT_AVAIL, 1, index=0, next=0x8000_0005),
        "00 41 0100 0000 1000 | 00000000 05000080",
    ),
    (p.event(MsgId.EVENT_USED, 1, index=3), "00 42 0100 0000 0c00 | 03000000"),
    (
        Message(BusMsgId.GET_DEVICES, 0, 11, False, True, {"offset": 8, "count": 16}),
        "02 02 0000 0b00 0c00 | 0800 1000",
    ),
    (  # devices 8 and 17 present of 8..23; no more after 24
        Message(
            BusMsgId.GET_DEVICES,
            0,
            11,
            True,
            True,
            {"offset": 8, "count": 16, "next_offset": 0},
            b"\x01\x02",
        ),  # fmt: skip
        "03 02 0000 0b00 1000 | 0800 1000 0000 | 0102",
    ),
    (
        Message(BusMsgId.PING, 0, 12, False, True, {"data": 0xDEADBEEF}),
        "02 03 0000 0c00 0c00 | efbeadde",
    ),
    (
        Message(BusMsgId.PING, 0, 12, True, True, {"data": 0xDEADBEEF}),
        "03 03 0000 0c00 0c00 | efbeadde",
    ),
    (
        Message(BusMsgId.EVENT_DEVICE, 0, 0, False, True, {"dev_num": 5, "state": 1}),
        "02 40 0000 0000 0c00 | 0500 0100",
    ),
]


@pytest.mark.parametrize(
    "msg,wire", CASES, ids=lambda v: v.describe() if isinstance(v, Message) else ""
)
def test_layout_matches_hand_computed_bytes(msg: Message, wire: str) -> None:
    raw = h(wire)
    assert p.encode(msg) == raw
    got = p.decode(raw)
    assert (got.msg_id, got.dev_num, got.token, got.response, got.bus) == (
        msg.msg_id, msg.dev_num, msg.token, msg.response, msg.bus,
    )  # fmt: skip
    layout = p.LAYOUTS[(msg.bus, msg.msg_id, msg.response)]
    assert dict(got.fields) == {f: msg.fields.get(f, 0) for f in layout.fields}
    assert got.data == msg.data


def test_every_message_of_the_draft_has_a_layout() -> None:
    requests = {m for m in MsgId if m < p.EVENT_ID_BASE}
    for m in MsgId:
        assert (False, m, False) in p.LAYOUTS, m.name
    for m in requests:
        assert (False, m, True) in p.LAYOUTS, m.name
    for b in BusMsgId:
        assert (True, b, False) in p.LAYOUTS
    assert (True, BusMsgId.GET_DEVICES, True) in p.LAYOUTS
    assert (True, BusMsgId.PING, True) in p.LAYOUTS
    # ... and the hand-computed cases above cover every one of them.
    assert {(m.bus, m.msg_id, m.response) for m, _ in CASES} == set(p.LAYOUTS)


def test_features_words_round_trip() -> None:
    f = 1 << 33 | 1 << 32 | 1 << 9 | 1 << 6
    assert p.features_to_words(f, 0, 2) == struct.pack("<II", 1 << 9 | 1 << 6, 3)
    assert p.features_to_words(f, 1, 3) == struct.pack("<III", 3, 0, 0)  # zeros past the end
    assert p.words_to_features(p.features_to_words(f, 0, 2), 0) == f
    assert p.words_to_features(struct.pack("<I", 3), 1) == 3 << 32


def test_type_reserved_bits_are_ignored() -> None:
    raw = bytearray(h("00 07 0200 0500 0800"))
    raw[0] |= 0xFC
    assert p.decode(bytes(raw)).name == "VIRTIO_MSG_GET_DEVICE_STATUS"


def test_bytes_after_msg_size_are_slot_padding() -> None:
    raw = h("00 42 0100 0000 0c00 | 03000000") + b"\xff" * 252
    assert p.decode(raw)["index"] == 3


# -- the rules ---------------------------------------------------------------------------


SET_VQ = p.request(MsgId.SET_VQUEUE, 1, 8, index=0, size=256, desc=0, driver=0, device=0)


def reject(raw: bytes, match: str, max_size: int = p.MAX_MSG_SIZE) -> None:
    with pytest.raises(VirtioMsgError, match=match):
        p.decode(raw, max_size)


def test_rule_header_is_8_bytes() -> None:
    reject(b"\x00\x02\x00\x00\x01\x00\x08", "shorter than the 8-byte header")


def test_rule_msg_size_at_least_header() -> None:
    reject(h("00 02 0000 0100 0700"), "msg_size 7 outside 8..264")


def test_rule_msg_size_within_bus_maximum() -> None:
    reject(h("00 02 0000 0100 0901") + bytes(0x109), "msg_size 265 outside 8..264")
    reject(h("00 07 0000 0100 0c00 | 00000000"), "outside 8..10", max_size=10)


def test_rule_msg_size_covers_present_bytes() -> None:
    reject(h("00 08 0000 0100 0c00 | 0000"), "msg_size 12 but only 10 bytes")


def test_rule_bus_message_dev_num_zero() -> None:
    reject(h("02 03 0100 0100 0c00 | 00000000"), "dev_num 1, must be 0")


def test_rule_request_token_nonzero() -> None:
    reject(h("00 02 0000 0000 0800"), "request with token 0")


def test_rule_response_token_nonzero() -> None:
    reject(h("01 07 0000 0000 0c00 | 00000000"), "response with token 0")


def test_rule_event_token_zero() -> None:
    reject(h("00 42 0000 0700 0c00 | 00000000"), "event with token 7")


def test_rule_event_is_never_a_response() -> None:
    reject(h("01 42 0000 0000 0c00 | 00000000"), "is an event and cannot be a response")


def test_rule_unknown_id_refused() -> None:
    reject(h("00 01 0000 0100 0800"), "unknown transport message 0x01")
    reject(h("00 0d 0000 0100 0800"), "unknown transport message 0x0d")
    reject(h("02 41 0000 0000 0800"), "unknown bus message 0x41")


def test_rule_reserved_ids_refused() -> None:
    reject(h("00 80 0000 0100 0800"), "reserved range")
    reject(h("02 c0 0000 0000 0800"), "reserved range")


def test_rule_exact_payload_size() -> None:
    reject(h("00 07 0000 0100 0c00 | 00000000"), "payload 4 bytes, expected 0")
    reject(h("00 08 0000 0100 0a00 | 0000"), "payload 2 bytes, expected at least 4")
    reject(h("00 42 0000 0000 1000 | 00000000 00000000"), "payload 8 bytes, expected 4")


def test_rule_tail_length_follows_its_count() -> None:
    # SET_CONFIG says 4 bytes of data but carries 2.
    reject(
        h("00 06 0000 0100 1600 | 00000000 00000000 04000000 | 0102"), r"expected 16 \(size = 4\)"
    )
    # SET_DRIVER_FEATURES: 2 blocks announced, one word present.
    reject(h("00 04 0000 0100 1400 | 00000000 02000000 | 00000000"), r"num_blocks = 2")
    # A huge count is just a mismatch, never an allocation.
    reject(h("00 04 0000 0100 1400 | 00000000 ffffffff | 00000000"), r"num_blocks = 4294967295")


def test_rule_reserved_fields_must_be_zero() -> None:
    raw = bytearray(p.encode(SET_VQ))
    raw[8 + 4] = 1  # SET_VQUEUE reserved0
    reject(bytes(raw), "reserved field reserved0")
    raw = bytearray(p.encode(SET_VQ))
    raw[8 + 12] = 1
    reject(bytes(raw), "reserved field reserved1")


def test_rule_get_devices_multiples_of_8() -> None:
    reject(h("02 02 0000 0100 0c00 | 0400 0800"), "offset 4 is not a multiple of 8")
    reject(h("02 02 0000 0100 0c00 | 0000 0900"), "count 9 is not a multiple of 8")


def test_encode_refuses_what_decode_refuses() -> None:
    with pytest.raises(VirtioMsgError, match="unknown"):
        p.encode(p.request(MsgId.GET_CONFIG, 0, 1, offset=0, size=0, bogus=1))
    with pytest.raises(VirtioMsgError, match="missing"):
        p.encode(p.request(MsgId.GET_CONFIG, 0, 1, offset=0))
    with pytest.raises(VirtioMsgError, match="tail bytes"):
        p.encode(p.request(MsgId.SET_CONFIG, 0, 1, b"x", generation=0, offset=0, size=2))
    with pytest.raises(VirtioMsgError, match="exceed the bus maximum"):
        p.encode(p.request(MsgId.SET_CONFIG, 0, 1, bytes(250), generation=0, offset=0, size=250))
    with pytest.raises(VirtioMsgError, match="reserved field"):
        p.encode(p.request(MsgId.SET_VQUEUE, 0, 1, index=0, reserved0=1, size=1, desc=0,
                           driver=0, device=0))  # fmt: skip
    with pytest.raises(VirtioMsgError, match="cannot be a response"):
        p.encode(Message(MsgId.EVENT_USED, 0, 0, True, False, {"index": 0}))
    with pytest.raises(VirtioMsgError, match="token 0"):
        p.encode(p.request(MsgId.GET_DEVICE_STATUS, 0, 0))
    with pytest.raises(VirtioMsgError, match="event with token 3"):
        p.encode(Message(MsgId.EVENT_USED, 0, 3, False, False, {"index": 0}))
    with pytest.raises(VirtioMsgError, match="dev_num 2, must be 0"):
        p.encode(Message(BusMsgId.PING, 2, 1, False, True, {"data": 0}))


def test_event_avail_fast_path_agrees_with_decode() -> None:
    """The data path's reader of EVENT_AVAIL takes exactly what decode() reads as one; every
    variant it declines is left to decode (which may still accept it, e.g. slot padding, or
    refuse it with the rule's message)."""
    good = p.encode(p.event(MsgId.EVENT_AVAIL, 3, index=1, next=0))
    assert p.event_avail(good) == (3, 1) and p.event_avail(good + bytes(40)) == (3, 1)
    variants = [
        good[:15],
        bytes([1]) + good[1:],  # a response
        good[:1] + bytes([MsgId.EVENT_USED]) + good[2:],
        good[:4] + struct.pack("<H", 9) + good[6:],  # token
        good[:6] + struct.pack("<H", 20) + good[8:] + bytes(4),  # msg_size
        bytes([2]) + good[1:],  # a bus message
    ]
    for raw in variants:
        assert p.event_avail(raw) is None
        try:
            msg = p.decode(raw)
        except VirtioMsgError:
            continue
        assert (msg.bus, msg.response, msg.msg_id) != (False, False, MsgId.EVENT_AVAIL)
    for raw in (good, good + bytes(40)):
        msg = p.decode(raw)
        assert (msg.dev_num, msg["index"]) == p.event_avail(raw)
