"""virtio-vsock (hybrid mode) through the real vhost-user back-end and a synthetic driver."""

import os
import socket
import threading
import time

import pytest

from edgevirt.backend.devices import parse_device
from edgevirt.backend.devices.vsock import (
    HDR,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    SHUTDOWN_SEND,
    VsockDevice,
)
from edgevirt.errors import ConfigError
from tests.helpers import vhost_user, wait_until

BASE = 0x5C000000
CID = 7
GUEST_ALLOC = 64 * 1024


class Guest:
    """The driver half: posts receive buffers, sends packets, collects what arrives."""

    def __init__(self, fe):
        self.fe = fe
        self.rx = fe.vrings[0].driver
        self.tx = fe.vrings[1].driver
        self.gpas = {}
        self.fwd = 0

    def post(self, n=16, size=4096 + 44):
        for _ in range(n):
            h = self.rx.add([], [size])
            addr, ln, _, _ = self.rx.read_desc(h)
            self.gpas[h] = addr
        self.fe.kick(0)

    def send(
        self, op, src_port, dst_port, payload=b"", *, cid=CID, dst=2, typ=1, flags=0, length=None
    ):
        hdr = HDR.pack(
            cid,
            dst,
            src_port,
            dst_port,
            len(payload) if length is None else length,
            typ,
            op,
            flags,
            GUEST_ALLOC,
            self.fwd,
        )
        self.tx.add([hdr + payload])
        self.fe.kick(1)

    def packets(self, want=1, timeout=5.0):
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < want and time.monotonic() < deadline:
            self.fe.wait_call(0, 0.2)
            for h, n in self.rx.get_used():
                raw = self.rx.read(self.gpas.pop(h), n)
                out.append((HDR.unpack_from(raw), raw[44:n]))
        return out


@pytest.fixture
def vsock(tmp_path):
    dev = VsockDevice(CID, tmp_path)
    with vhost_user(dev, tmp_path / "vsock.sock") as (fe, be):
        rx = fe.setup_vring(0, 64, base=BASE)
        rx.driver.data_end = BASE + (4 << 20)
        fe.setup_vring(1, 64, base=BASE + (4 << 20))
        assert wait_until(lambda: all(v.queue is not None for v in be.vrings[:2]))
        yield dev, Guest(fe), tmp_path, be


def listen(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    s.settimeout(5)
    return s


def test_config_holds_the_guest_cid(vsock):
    dev, *_ = vsock
    assert dev.config() == CID.to_bytes(8, "little")


def test_connect_to_closed_port_gets_rst(vsock):
    dev, g, _, _ = vsock
    g.post(4)
    g.send(OP_REQUEST, 1000, 9999)
    [(hdr, _)] = g.packets()
    assert hdr[6] == OP_RST and (hdr[2], hdr[3]) == (9999, 1000) and hdr[1] == CID
    assert dev.stats.by_type["request_no_listener"] == 1


def test_guest_stream_both_ways_with_credit(vsock):
    dev, g, d, _ = vsock
    srv = listen(d / "vsock_5000")
    g.post(32)
    g.send(OP_REQUEST, 1000, 5000)
    c, _ = srv.accept()
    [(hdr, _)] = g.packets()
    assert hdr[6] == OP_RESPONSE and hdr[8] == dev.buf_alloc
    data = os.urandom(100_000)
    for i in range(0, len(data), 4096):
        g.send(OP_RW, 1000, 5000, data[i : i + 4096])
    got = b""
    c.settimeout(5)
    while len(got) < len(data):
        got += c.recv(65536)
    assert got == data
    # host → guest: the guest's credit (64 KiB) bounds what arrives before it frees any.
    back = os.urandom(200_000)
    threading.Thread(target=c.sendall, args=(back,), daemon=True).start()
    recv = b""
    deadline = time.monotonic() + 10
    while len(recv) < len(back) and time.monotonic() < deadline:
        g.post(16)
        for hdr, payload in g.packets(16, 0.3):
            if hdr[6] == OP_RW:
                recv += payload
        assert len(recv) <= g.fwd + GUEST_ALLOC, "device sent beyond the guest's credit"
        g.fwd = len(recv)
        g.send(OP_CREDIT_UPDATE, 1000, 5000)
    assert recv == back
    c.close()
    g.post(4)
    shut = [h for h, _ in g.packets(4, 2) if h[6] == OP_SHUTDOWN]
    assert shut, "the unix peer hung up: the guest must be told"


def test_host_initiated_connection(vsock):
    dev, g, d, _ = vsock
    g.post(8)
    h = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    h.settimeout(5)
    h.connect(str(d / "vsock"))
    h.sendall(b"CONNECT 6000\n")
    [(hdr, _)] = g.packets()
    assert hdr[6] == OP_REQUEST and hdr[3] == 6000 and hdr[0] == 2 and hdr[1] == CID
    host_port = hdr[2]
    g.send(OP_RESPONSE, 6000, host_port)
    assert h.recv(64) == f"OK {host_port}\n".encode()
    g.send(OP_RW, 6000, host_port, b"hello")
    assert h.recv(64) == b"hello"


def test_host_connect_refused_by_guest_closes_socket(vsock):
    dev, g, d, _ = vsock
    g.post(8)
    h = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    h.settimeout(5)
    h.connect(str(d / "vsock"))
    h.sendall(b"CONNECT 6001\n")
    [(hdr, _)] = g.packets()
    g.send(OP_RST, 6001, hdr[2])
    assert h.recv(64) == b""


@pytest.mark.parametrize(
    "kw, counter",
    [
        ({"length": 99}, "tx_bad_len"),  # len disagrees with the payload
        ({"cid": 3}, "tx_bad_cid"),  # spoofed source CID
        ({"dst": 5}, "tx_bad_cid"),  # not for the host
        ({"typ": 2}, "tx_bad_type"),  # seqpacket was not offered
    ],
)
def test_bogus_headers_are_dropped_queue_keeps_serving(vsock, kw, counter):
    dev, g, d, be = vsock
    g.post(8)
    g.send(OP_REQUEST, 1000, 5000, b"", **kw)
    assert wait_until(lambda: dev.stats.by_type.get(counter) == 1)
    g.send(OP_REQUEST, 1001, 9999)  # still answered
    pkts = g.packets(1 if counter == "tx_bad_cid" else 2, 2)  # a spoofed CID gets no answer
    assert pkts and pkts[-1][0][6] == OP_RST and pkts[-1][0][3] == 1001
    assert be.vrings[1].broken is None and dev.conns == {}


def test_unknown_op_and_short_chain(vsock):
    dev, g, d, be = vsock
    srv = listen(d / "vsock_5000")
    g.post(8)
    g.send(OP_REQUEST, 1000, 5000)
    c, _ = srv.accept()  # kept open: a closed peer would be reported as SHUTDOWN
    g.packets()
    g.send(42, 1000, 5000)
    [(hdr, _)] = g.packets()
    assert hdr[6] == OP_RST and dev.stats.by_type["tx_bad_op"] == 1 and dev.conns == {}
    g.tx.add([b"tiny"])
    g.fe.kick(1)
    assert wait_until(lambda: dev.stats.by_type.get("tx_bad_chain") == 1)
    assert be.vrings[1].broken is None


def test_credit_overrun_resets_that_connection_only(vsock):
    dev, g, d, _ = vsock
    srv = listen(d / "vsock_5000")
    g.post(8)
    g.send(OP_REQUEST, 1000, 5000)
    g.send(OP_REQUEST, 1001, 5000)
    c1, _ = srv.accept()
    c2, _ = srv.accept()
    g.packets(2)
    # Nobody reads c1: the back-end may hold buf_alloc bytes for it, not more.
    c1.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    chunk = os.urandom(60_000)
    for _ in range(dev.buf_alloc // len(chunk) + 40):
        g.send(OP_RW, 1000, 5000, chunk)
        if (5000, 1000) not in dev.conns:
            break
    assert wait_until(lambda: (5000, 1000) not in dev.conns)
    assert dev.stats.by_type["credit_overrun"] == 1 and (5000, 1001) in dev.conns


def test_parse_vsock_options(tmp_path):
    with pytest.raises(ConfigError, match="guest CID"):
        parse_device(f"vsock:cid=2,dir={tmp_path}")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="Not a directory"):
        parse_device(f"vsock:cid=3,dir={tmp_path}/file/sub")
    d = parse_device(f"vsock:cid=3,dir={tmp_path}")
    assert (tmp_path / "vsock").exists()
    d.close()
    assert not (tmp_path / "vsock").exists()


def test_guest_that_never_reads_rx_bounds_control_packets(vsock):
    from edgevirt.backend.devices.vsock import MAX_CONTROL

    dev, g, _, _ = vsock
    outstanding = 0
    for i in range(MAX_CONTROL + 40):  # each is answered with RST, nobody takes them
        if outstanding >= 48:  # the driver reclaims its transmit descriptors
            deadline = time.monotonic() + 10
            while outstanding > 16:
                assert time.monotonic() < deadline, "transmit chains not used"
                outstanding -= len(g.tx.get_used())
                time.sleep(0.005)
        if outstanding == 0:
            g.tx.reset_data()
        g.send(OP_REQUEST, 2000 + i, 9999)
        outstanding += 1
    assert wait_until(lambda: dev.stats.requests == MAX_CONTROL + 40)
    assert len(dev.control) == MAX_CONTROL
    assert dev.stats.by_type["control_dropped"] == 40


def test_unix_peer_hanging_up_mid_stream_resets_that_stream(vsock):
    dev, g, d, be = vsock
    srv = listen(d / "vsock_5000")
    g.post(8)
    g.send(OP_REQUEST, 1000, 5000)
    c, _ = srv.accept()
    g.packets()
    c.close()  # the host program dies while the guest still sends
    for _ in range(3):
        g.send(OP_RW, 1000, 5000, b"x" * 4096)
    pkts = [h for h, _ in g.packets(2, 3)]
    assert {h[6] for h in pkts} & {OP_RST, OP_SHUTDOWN}, pkts
    assert wait_until(lambda: (5000, 1000) not in dev.conns)
    assert be.vrings[1].broken is None


def test_unix_peer_half_close_still_takes_the_guests_data(vsock):
    """A host program that shuts down only its writing half (EOF to the guest) still reads:
    the guest is told SHUTDOWN(SEND) only, its later data arrives, and its own
    SHUTDOWN(SEND) ends the connection with EOF on the host side and RST to the guest."""
    dev, g, d, _ = vsock
    srv = listen(d / "vsock_5000")
    g.post(16)
    g.send(OP_REQUEST, 1000, 5000)
    c, _ = srv.accept()
    c.settimeout(5)
    [(hdr, _)] = g.packets()
    assert hdr[6] == OP_RESPONSE
    c.shutdown(socket.SHUT_WR)
    [(hdr, _)] = g.packets()
    assert hdr[6] == OP_SHUTDOWN and hdr[7] == SHUTDOWN_SEND, hdr
    data = os.urandom(3000)
    g.send(OP_RW, 1000, 5000, data)
    got = b""
    while len(got) < len(data):
        got += c.recv(65536)
    assert got == data
    g.send(OP_SHUTDOWN, 1000, 5000, flags=SHUTDOWN_SEND)
    assert c.recv(1) == b""  # the guest's EOF reached the host program
    assert wait_until(lambda: not dev.conns)
    assert any(h[6] == OP_RST for h, _ in g.packets(1, 2))
    c.close()
