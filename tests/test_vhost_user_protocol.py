"""vhost-user message validation: every malformed message is a VhostUserError."""

import struct

import pytest

from edgevirt.backend.transport.vhost_user import protocol as p
from edgevirt.backend.transport.vhost_user.protocol import Request as R
from edgevirt.errors import VhostUserError


def hdr(req, size, flags=p.VERSION):
    return p.HEADER.pack(req, flags, size)


def test_header_ok():
    assert p.parse_header(hdr(R.GET_FEATURES, 0)) == (1, 1, 0)


def test_header_rejects_wrong_version():
    with pytest.raises(VhostUserError, match="version 2, expected 1"):
        p.parse_header(hdr(R.GET_FEATURES, 0, flags=2))


def test_header_rejects_reply_flag_from_front_end():
    with pytest.raises(VhostUserError, match="REPLY"):
        p.parse_header(hdr(R.GET_FEATURES, 0, flags=p.VERSION | p.FLAG_REPLY))


def test_header_rejects_oversized_payload():
    with pytest.raises(VhostUserError, match="exceeds limit 4096"):
        p.parse_header(hdr(R.SET_MEM_TABLE, p.MAX_PAYLOAD + 1))


def test_header_rejects_short_header():
    with pytest.raises(VhostUserError, match="short header"):
        p.parse_header(b"\x01\x00")


def test_unknown_request():
    with pytest.raises(VhostUserError, match="unknown request code 999"):
        p.decode(999, p.VERSION, b"", [])


@pytest.mark.parametrize("req", [R.SET_FEATURES, R.SET_PROTOCOL_FEATURES])
def test_u64_payload_size_exact(req):
    assert p.decode(req, 1, p.U64.pack(5), []).u64() == 5
    with pytest.raises(VhostUserError, match="payload 4 bytes, expected 8"):
        p.decode(req, 1, b"\0" * 4, [])


def test_vring_state_size():
    assert p.decode(R.SET_VRING_NUM, 1, p.VRING_STATE.pack(0, 256), []).state() == (0, 256)
    with pytest.raises(VhostUserError, match="SET_VRING_NUM: payload 12 bytes, expected 8"):
        p.decode(R.SET_VRING_NUM, 1, b"\0" * 12, [])


def test_vring_addr_size():
    with pytest.raises(VhostUserError, match="SET_VRING_ADDR: payload 8 bytes, expected 40"):
        p.decode(R.SET_VRING_ADDR, 1, b"\0" * 8, [])


def mem_table(regions):
    body = p.MEM_HEADER.pack(len(regions), 0)
    for r in regions:
        body += p.MEM_REGION.pack(*r)
    return body


def test_mem_table_ok():
    msg = p.decode(R.SET_MEM_TABLE, 1, mem_table([(0x5C000000, 0x4000000, 0x7F0000000000, 0)]), [7])
    (r,) = p.mem_regions(msg)
    assert (r.gpa, r.size, r.uva, r.offset) == (0x5C000000, 0x4000000, 0x7F0000000000, 0)


def test_mem_table_region_count_must_match_fds():
    with pytest.raises(VhostUserError, match="1 regions but 0 fds"):
        p.decode(R.SET_MEM_TABLE, 1, mem_table([(0, 4096, 0, 0)]), [])


def test_mem_table_too_many_regions():
    body = p.MEM_HEADER.pack(9, 0) + b"\0" * 32 * 9
    with pytest.raises(VhostUserError, match="9 regions, expected 1..8"):
        p.decode(R.SET_MEM_TABLE, 1, body, list(range(9)))


def test_mem_table_truncated_region_array():
    body = mem_table([(0, 4096, 0, 0), (4096, 4096, 0, 0)])[:-8]
    with pytest.raises(VhostUserError, match="expected 72"):
        p.decode(R.SET_MEM_TABLE, 1, body, [3, 4])


def test_mem_region_wrapping_address_space():
    msg = p.decode(R.SET_MEM_TABLE, 1, mem_table([(2**64 - 4096, 8192, 0, 0)]), [3])
    with pytest.raises(VhostUserError, match="wraps the address space"):
        p.mem_regions(msg)


def test_kick_fd_consistency_with_nofd_flag():
    assert p.decode(R.SET_VRING_KICK, 1, p.U64.pack(0), [5]).fds == [5]
    assert p.decode(R.SET_VRING_KICK, 1, p.U64.pack(p.VRING_NOFD_MASK), []).fds == []
    with pytest.raises(VhostUserError, match="0 fds attached with NOFD=0"):
        p.decode(R.SET_VRING_KICK, 1, p.U64.pack(0), [])
    with pytest.raises(VhostUserError, match="1 fds attached with NOFD=1"):
        p.decode(R.SET_VRING_CALL, 1, p.U64.pack(p.VRING_NOFD_MASK), [5])


def test_config_bounds():
    ok = p.CONFIG_HEADER.pack(0, 8, 0)
    assert p.decode(R.GET_CONFIG, 1, ok + b"\0" * 8, []).request is R.GET_CONFIG
    with pytest.raises(VhostUserError, match="beyond config limit"):
        p.decode(R.GET_CONFIG, 1, p.CONFIG_HEADER.pack(0, 1000, 0), [])
    with pytest.raises(VhostUserError, match="expected 20"):
        p.decode(R.GET_CONFIG, 1, ok, [])


def test_backend_req_fd_needs_exactly_one_fd():
    with pytest.raises(VhostUserError, match="0 fds attached, expected 1"):
        p.decode(R.SET_BACKEND_REQ_FD, 1, b"", [])


def test_reply_packing():
    raw = p.pack(R.GET_FEATURES, struct.pack("<Q", 1 << 32))
    assert p.HEADER.unpack_from(raw) == (1, p.VERSION | p.FLAG_REPLY, 8)
