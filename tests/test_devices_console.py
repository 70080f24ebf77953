"""virtio-console MULTIPORT through the real vhost-user back-end and a synthetic driver."""

import socket
import time

import pytest

from edgevirt.backend.devices import parse_device
from edgevirt.backend.devices.console import (
    CONSOLE_PORT,
    CONTROL,
    DEVICE_ADD,
    DEVICE_READY,
    PORT_NAME,
    PORT_OPEN,
    PORT_READY,
    ConsoleDevice,
)
from edgevirt.errors import ConfigError
from tests.helpers import vhost_user, wait_until

BASE = 0x5C000000
MIB = 1 << 20


class Driver:
    def __init__(self, fe, nq):
        self.fe = fe
        self.q = {i: fe.vrings[i].driver for i in range(nq)}
        self.gpas = {}

    def post(self, queue, n=4, size=256):
        for _ in range(n):
            h = self.q[queue].add([], [size])
            self.gpas[(queue, h)] = self.q[queue].read_desc(h)[0]
        self.fe.kick(queue)

    def send(self, queue, data):
        self.q[queue].add([data])
        self.fe.kick(queue)

    def used(self, queue, want=1, timeout=5.0):
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < want and time.monotonic() < deadline:
            self.fe.wait_call(queue, 0.1)
            for h, n in self.q[queue].get_used():
                gpa = self.gpas.pop((queue, h), None)
                out.append(self.q[queue].read(gpa, n) if gpa is not None else n)
        return out

    def control(self, want, timeout=5.0):
        return [(CONTROL.unpack_from(m), m[8:]) for m in self.used(2, want, timeout)]


@pytest.fixture
def console(tmp_path):
    dev = ConsoleDevice(["log", "ctl"], tmp_path, console="log")
    with vhost_user(dev, tmp_path / "con.sock", 1 << 1, size=12 * MIB) as (fe, be):
        for i in range(dev.num_queues):
            fe.setup_vring(i, 32, base=BASE + i * 2 * MIB)
            fe.vrings[i].driver.data_end = BASE + (i + 1) * 2 * MIB
        assert wait_until(lambda: all(v.queue is not None for v in be.vrings))
        yield dev, Driver(fe, dev.num_queues), tmp_path, be


def handshake(drv):
    drv.post(2, 16)
    drv.send(3, CONTROL.pack(0, DEVICE_READY, 1))
    adds = drv.control(2)
    assert [m[0] for m in adds] == [(0, DEVICE_ADD, 1), (1, DEVICE_ADD, 1)]
    drv.send(3, CONTROL.pack(0, PORT_READY, 1))
    drv.send(3, CONTROL.pack(1, PORT_READY, 1))
    return drv.control(5)


def test_config_and_queues(console):
    dev, *_ = console
    assert dev.num_queues == 6 and dev.config()[4:8] == (2).to_bytes(4, "little")


def test_multiport_handshake_names_ports_and_marks_the_console(console):
    _, drv, _, _ = console
    msgs = handshake(drv)
    assert ((0, CONSOLE_PORT, 1), b"") in msgs
    assert ((0, PORT_NAME, 1), b"log") in msgs and ((1, PORT_NAME, 1), b"ctl") in msgs
    assert ((0, PORT_OPEN, 1), b"") in msgs and ((1, PORT_OPEN, 1), b"") in msgs


def test_port_bytes_both_ways_and_logged(console):
    dev, drv, d, _ = console
    handshake(drv)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(5)
    c.connect(str(d / "ctl.sock"))
    assert wait_until(lambda: dev.ports[1].client is not None)
    data = bytes(range(256)) * 8
    drv.send(5, data)  # port 1 transmitq
    got = b""
    while len(got) < len(data):
        got += c.recv(4096)
    assert got == data and (d / "ctl.log").read_bytes() == data
    drv.post(4, 2)  # port 1 receiveq
    c.sendall(b"hello guest")
    assert drv.used(4, 1, 0.3) == []  # held back: the guest has not opened the port
    drv.send(3, CONTROL.pack(1, PORT_OPEN, 1))
    [msg] = drv.used(4)
    assert msg == b"hello guest"
    # output with nobody attached is logged, and the guest is not blocked
    drv.send(1, b"boot log line\n")
    assert drv.used(1) == [0]
    assert (d / "log.log").read_bytes() == b"boot log line\n"


def test_slow_client_defers_transmit_chains_instead_of_buffering(console):
    dev, drv, d, be = console
    handshake(drv)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.connect(str(d / "ctl.sock"))
    assert wait_until(lambda: dev.ports[1].client is not None)
    chunk = b"z" * 60000
    for _ in range(8):
        drv.send(5, chunk)
    assert wait_until(lambda: len(dev.ports[1].tx) > 0)
    assert be.vrings[5].stats.deferred > 0
    got = 0
    c.settimeout(5)
    while got < 8 * len(chunk):
        got += len(c.recv(65536))
    assert wait_until(lambda: not dev.ports[1].tx)
    assert len(drv.used(5, 8)) == 8


def test_bad_control_messages_dropped(console):
    dev, drv, _, be = console
    handshake(drv)
    drv.send(3, b"\x01\x02")  # shorter than the header
    drv.send(3, CONTROL.pack(7, PORT_READY, 1))  # no such port
    drv.send(3, CONTROL.pack(0, DEVICE_ADD, 1))  # a device's event, not a driver's
    assert wait_until(lambda: dev.stats.errors == 3)
    s = dev.stats.by_type
    assert s["ctrl_bad_chain"] == 1 and s["ctrl_bad_port"] == 1 and s["ctrl_bad_event"] == 1
    assert all(v.broken is None for v in be.vrings)


def test_parse_console_options(tmp_path):
    with pytest.raises(ConfigError, match="port name"):
        parse_device(f"console:ports=a/b,dir={tmp_path}")
    with pytest.raises(ConfigError, match="repeat"):
        parse_device(f"console:ports=a+a,dir={tmp_path}")
    dev = parse_device(f"console:ports=log!+data,dir={tmp_path}")
    assert isinstance(dev, ConsoleDevice) and dev.ports[0].console and not dev.ports[1].console
    assert (tmp_path / "data.sock").exists()
    dev.close()


def test_pty_port_both_ways(tmp_path):
    """A port whose host side is a pseudo-terminal: open <dir>/<name>.pty like a serial line."""
    import os

    dev = ConsoleDevice.from_ports("log@pty!+ctl", str(tmp_path))
    assert dev.ports[0].console and (tmp_path / "log.pty").is_symlink()
    with vhost_user(dev, tmp_path / "con.sock", 1 << 1, size=12 * MIB) as (fe, _):
        for i in range(dev.num_queues):
            fe.setup_vring(i, 32, base=BASE + i * 2 * MIB)
            fe.vrings[i].driver.data_end = BASE + (i + 1) * 2 * MIB
        drv = Driver(fe, dev.num_queues)
        handshake(drv)
        fd = os.open(tmp_path / "log.pty", os.O_RDWR | os.O_NOCTTY)
        drv.send(1, b"guest says hi")  # port 0 transmitq
        assert drv.used(1) == [0]
        got = b""
        while len(got) < 13:
            got += os.read(fd, 64)
        assert got == b"guest says hi" and (tmp_path / "log.log").read_bytes() == got
        drv.send(3, CONTROL.pack(0, PORT_OPEN, 1))
        drv.post(0, 2)
        os.write(fd, b"typed")
        assert drv.used(0) == [b"typed"]
        os.close(fd)
        # nobody reads the pty: output beyond its buffer is dropped, the guest never blocks
        for _ in range(40):
            drv.send(1, b"x" * 4000)
            assert drv.used(1) == [0]
        assert dev.snapshot()["ports"][0]["pty_dropped"] > 0
    assert not (tmp_path / "log.pty").exists()
