"""virtio-net through the real vhost-user back-end (synthetic front-end, datagram link)."""

import os
import socket
import struct
import time

import pytest

from edgevirt.backend.devices import parse_device
from edgevirt.backend.devices.net import (
    F_CSUM,
    F_HOST_TSO4,
    F_MRG_RXBUF,
    HDR,
    NetDevice,
)
from edgevirt.backend.devices.tap import DatagramLink
from edgevirt.errors import ConfigError
from tests.helpers import vhost_user, wait_until

BASE = 0x5C000000
FRAME = bytes(range(256)) * 5 + b"\xee" * 234  # 1514 bytes


@pytest.fixture
def net(tmp_path):
    """A net device on a datagram link, served on a loop thread; yields (device, fe, link)."""
    yield from serve(tmp_path, 1 << F_MRG_RXBUF)


@pytest.fixture
def net_offload(tmp_path):
    yield from serve(tmp_path, 1 << F_MRG_RXBUF | 1 << F_CSUM | 1 << F_HOST_TSO4)


def serve(tmp_path, features):
    link = DatagramLink()
    dev = NetDevice(link)
    with vhost_user(dev, tmp_path / "net.sock", features) as (fe, be):
        rx = fe.setup_vring(0, 64, base=BASE)
        rx.driver.data_end = BASE + (4 << 20)
        fe.setup_vring(1, 64, base=BASE + (4 << 20))
        assert wait_until(lambda: all(v.queue is not None for v in be.vrings))
        yield dev, fe, link, be


def writable_gpas(drv, head):
    out = []
    for i in drv._chains[head]:
        addr, n, flags, _ = drv.read_desc(i)
        if flags & 2:
            out.append((addr, n))
    return out


def received(fe, drv, timeout=5.0):
    assert fe.wait_call(0, timeout), "no used notification on the receive queue"
    return drv.get_used()


def test_transmit_reaches_the_link_byte_exact(net):
    dev, fe, link, _ = net
    drv = fe.vrings[1].driver
    drv.add([HDR.pack(0, 0, 0, 0, 0, 0, 0) + FRAME])
    fe.kick(1)
    assert fe.wait_call(1)
    assert link.peer.recv(70000) == bytes(12) + FRAME
    assert dev.stats.by_type["tx_frames"] == 1 and dev.stats.bytes_read == len(FRAME)


def test_receive_waits_for_a_frame_then_fills_one_buffer(net):
    dev, fe, link, be = net
    drv = fe.vrings[0].driver
    heads = [drv.add([], [1526]) for _ in range(4)]
    [(gpa, _)] = writable_gpas(drv, heads[0])
    fe.kick(0)
    assert wait_until(lambda: len(dev.rx) == 4), "receive buffers were not deferred"
    assert be.vrings[0].stats.deferred == 4 and drv.get_used() == []
    link.peer.send(bytes(12) + FRAME)
    [(head, n)] = received(fe, drv)
    assert head == heads[0] and n == 12 + len(FRAME)
    data = drv.read(gpa, n)
    assert struct.unpack_from("<H", data, 10)[0] == 1  # num_buffers
    assert data[12:] == FRAME
    assert len(dev.rx) == 3


def test_mergeable_frame_spans_buffers_and_says_how_many(net):
    dev, fe, link, _ = net
    drv = fe.vrings[0].driver
    heads = [drv.add([], [512]) for _ in range(5)]
    gpas = {h: writable_gpas(drv, h)[0][0] for h in heads}
    fe.kick(0)
    assert wait_until(lambda: len(dev.rx) == 5)
    link.peer.send(bytes(12) + FRAME)
    used = received(fe, drv)
    assert [h for h, _ in used] == heads[:3] and [n for _, n in used] == [512, 512, 502]
    data = b"".join(drv.read(gpas[h], n) for h, n in used)
    assert struct.unpack_from("<H", data, 10)[0] == 3 and data[12:] == FRAME


def test_guest_that_never_refills_rx_is_not_buffered_for(net):
    dev, fe, link, _ = net
    link.peer.setblocking(False)
    sent = 0
    try:
        for _ in range(5000):
            link.peer.send(bytes(12) + FRAME[:100])
            sent += 1
    except BlockingIOError:
        pass
    time.sleep(0.2)
    assert dev.stats.by_type.get("rx_frames", 0) == 0 and len(dev.rx) == 0
    assert sent < 5000, "the link's own queue should have filled (bounded, not us)"
    drv = fe.vrings[0].driver
    for _ in range(8):
        drv.add([], [1526])
    fe.kick(0)
    got = []
    while len(got) < 8 and fe.wait_call(0, 5):
        got += drv.get_used()
    assert len(got) == 8 and all(n == 112 for _, n in got)


def test_bad_tx_header_is_dropped_and_queue_keeps_serving(net):
    dev, fe, link, be = net
    drv = fe.vrings[1].driver
    link.peer.setblocking(False)
    drv.add([HDR.pack(1, 0, 0, 0, 0, 0, 0) + FRAME])  # NEEDS_CSUM without CSUM
    drv.add([b"short"])  # shorter than the header
    drv.add([bytes(12) + FRAME], [64])  # device-writable buffer on transmit
    drv.add([bytes(12) + b"x" * 70000])  # larger than any Ethernet frame
    drv.add([bytes(12) + FRAME])  # a good one after them
    fe.kick(1)
    assert wait_until(lambda: len(drv.get_used()) or dev.stats.by_type.get("tx_frames"))
    assert wait_until(lambda: dev.stats.by_type.get("tx_frames") == 1)
    assert link.peer.recv(70000) == bytes(12) + FRAME
    with pytest.raises(BlockingIOError):
        link.peer.recv(70000)
    assert dev.stats.by_type["tx_bad_header"] == 1 and dev.stats.by_type["tx_bad_chain"] == 3
    assert be.vrings[1].broken is None


def test_bad_rx_chains_answered_empty(net):
    dev, fe, _, be = net
    drv = fe.vrings[0].driver
    drv.add([b"readable"], [1526])
    drv.add([], [4])
    fe.kick(0)
    used = received(fe, drv)
    assert [n for _, n in used] == [0, 0] and dev.stats.by_type["rx_bad_chain"] == 2
    assert be.vrings[0].broken is None and len(dev.rx) == 0


def test_deferred_chains_dropped_when_the_ring_stops(net):
    dev, fe, link, be = net
    drv = fe.vrings[0].driver
    for _ in range(3):
        drv.add([], [1526])
    fe.kick(0)
    assert wait_until(lambda: len(dev.rx) == 3)
    assert fe.get_vring_base(0) == 3  # GET_VRING_BASE stops the ring
    assert wait_until(lambda: len(dev.rx) == 0)
    link.peer.send(bytes(12) + FRAME)
    time.sleep(0.1)
    assert drv.get_used() == [] and dev.stats.by_type.get("rx_frames", 0) == 0


def test_link_gone_marks_link_down_and_keeps_serving(net):
    dev, fe, link, be = net
    link.peer.close()  # the "wire" disappears: writes fail
    drv = fe.vrings[1].driver
    drv.add([bytes(12) + FRAME])
    drv.add([bytes(12) + FRAME])
    fe.kick(1)
    assert wait_until(lambda: dev.stats.by_type.get("tx_link_down") == 2)
    assert not dev.link_up and dev.config()[6] == 0
    assert be.vrings[1].broken is None


def test_parse_net_options():
    with pytest.raises(ConfigError, match="needs tap="):
        parse_device("net:mac=52:54:00:00:00:01")
    with pytest.raises(ConfigError, match="unknown net option"):
        parse_device("net:tap=x,colour=blue")
    with pytest.raises(ConfigError, match="multicast"):
        parse_device("net:tap=x,mac=01:00:00:00:00:01")
    with pytest.raises(ConfigError, match="six hex bytes"):
        parse_device("net:tap=x,mac=zz")


def test_datagram_link_is_a_unix_socketpair():
    link = DatagramLink()
    assert link.peer.family == socket.AF_UNIX and link.fd >= 0
    link.close()
    assert link.fd == -1


def test_offload_headers_checked_against_what_was_negotiated(net_offload):
    dev, fe, link, be = net_offload
    assert dev.acked_features >> F_CSUM & 1 and dev.acked_features >> F_HOST_TSO4 & 1
    drv = fe.vrings[1].driver
    link.peer.setblocking(False)
    tso = HDR.pack(1, 1, 54, 1448, 34, 16, 0)  # NEEDS_CSUM, TCPV4, TCP checksum at 34+16
    big = bytes(12000)
    drv.add([tso + big])  # a TSO frame the guest may send: passes to the link
    drv.add([HDR.pack(1, 0, 0, 0, 34, 16, 0) + FRAME])  # checksum offload only: passes
    drv.add([HDR.pack(1, 4, 54, 1448, 34, 16, 0) + big])  # TCPV6: not negotiated
    drv.add([HDR.pack(1, 0, 0, 0, 1500, 16, 0) + FRAME])  # checksum beyond the frame
    drv.add([HDR.pack(0, 1, 54, 1448, 0, 0, 0) + big])  # TSO without NEEDS_CSUM
    drv.add([HDR.pack(4, 0, 0, 0, 0, 0, 0) + FRAME])  # undefined flag
    fe.kick(1)
    assert wait_until(lambda: dev.stats.by_type.get("tx_bad_header") == 4)
    assert link.peer.recv(70000) == tso + big
    assert link.peer.recv(70000)[12:] == FRAME
    with pytest.raises(BlockingIOError):
        link.peer.recv(70000)
    assert be.vrings[1].broken is None


def test_offload_off_offers_none(tmp_path):
    from edgevirt.backend.devices.net import OFFLOADS

    link = DatagramLink()
    assert NetDevice(link).features & OFFLOADS == OFFLOADS
    assert NetDevice(link, offload=False).features & OFFLOADS == 0
    link.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace and a TAP")
def test_real_tap_in_netns_and_its_disappearance(tmp_path):
    """A TAP the device creates inside a namespace; deleting the interface under it turns
    into link down and counted drops, not a crash."""
    import subprocess

    from edgevirt.backend.devices.tap import Tap
    from edgevirt.devsmoke.net import in_netns

    ns = f"evunit{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
    try:
        tap = Tap("evu0", ns)
        r = subprocess.run(in_netns(ns, "ip", "link", "show", "evu0"), capture_output=True,
                           text=True, timeout=30)  # fmt: skip
        assert r.returncode == 0 and "evu0" in r.stdout
        assert "evu0" not in subprocess.run(["ip", "link"], capture_output=True,
                                            text=True).stdout  # fmt: skip
        dev = NetDevice(tap)
        subprocess.run(in_netns(ns, "ip", "link", "del", "evu0"), check=True, timeout=30)
        from edgevirt.backend.memory import GuestMemory, memfd_region

        fd, region = memfd_region(0x5C000000, 1 << 16)
        mem = GuestMemory([region])
        from edgevirt.backend.devices.base import Chain

        dev._transmit(Chain(0, [(0x5C000000, 12 + 60)], []), mem)
        assert not dev.link_up and dev.stats.by_type["tx_link_down"] == 1
        dev.close()
        mem.close()
        os.close(fd)
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
