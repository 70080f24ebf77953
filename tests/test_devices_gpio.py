"""virtio-gpio with the simulated bank, through the real vhost-user back-end and a synthetic
driver; the outside world drives the bank through its control socket, as the CLI does."""

import struct
import time

import pytest

from edgevirt.backend.devices import parse_device
from edgevirt.backend.devices.gpio import (
    DIR_IN,
    DIR_NONE,
    DIR_OUT,
    GET_DIRECTION,
    GET_LINE_NAMES,
    GET_VALUE,
    IRQ_BOTH,
    IRQ_FALLING,
    IRQ_HIGH,
    IRQ_INVALID,
    IRQ_NONE,
    IRQ_RISING,
    IRQ_VALID,
    SET_DIRECTION,
    SET_IRQ_TYPE,
    SET_VALUE,
    STATUS_ERR,
    STATUS_OK,
    GpioError,
)
from edgevirt.backend.devices.gpiosim import control
from edgevirt.errors import ConfigError
from tests.helpers import chain_bufs, vhost_user, wait_until

BASE = 0x5C000000
NAMES = ["led", "button", "reset"]
LED, BUTTON, RESET = 0, 1, 2


class Driver:
    def __init__(self, fe):
        self.fe = fe
        self.req = fe.vrings[0].driver
        self.evq = fe.vrings[1].driver
        self.events = {}  # head -> line

    def call(self, typ, gpio, value=0, resp=2, readable=None):
        rd = [struct.pack("<HHI", typ, gpio, value) if readable is None else readable]
        h = self.req.add(rd, [resp] if resp else [])
        bufs = chain_bufs(self.req, h)
        self.fe.kick(0)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            self.fe.wait_call(0, 0.2)
            used = self.req.get_used()
            if used:
                assert used[0][0] == h, used
                n = used[0][1]
                w = [b for b in bufs if b[2] & 2]
                return self.req.read(w[0][0], n) if w and n else b""
        raise AssertionError("no response")

    def unmask(self, line, readable=None, writable=1):
        h = self.evq.add([struct.pack("<H", line) if readable is None else readable],
                         [writable] if writable else [])  # fmt: skip
        self.events[h] = chain_bufs(self.evq, h)
        self.fe.kick(1)
        return h

    def irqs(self, timeout=2.0, want=1):
        """(head, status byte) of the event pairs the device returned."""
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < want and time.monotonic() < deadline:
            self.fe.wait_call(1, 0.05)
            for h, n in self.evq.get_used():
                w = [b for b in self.events.pop(h) if b[2] & 2]
                out.append((h, self.evq.read(w[0][0], 1)[0] if n else None))
        return out


@pytest.fixture
def gpio(tmp_path):
    ctl = tmp_path / "gpio.sock"
    dev = parse_device(f"gpio:lines={'+'.join(NAMES)},ctl={ctl}")

    def outside(op, line, value=None):
        req = {"op": op, "line": line}
        if value is not None:
            req["value"] = value
        return control(ctl, req)

    with vhost_user(dev, tmp_path / "gpio-vu.sock", features=1) as (fe, be):  # F_IRQ
        fe.setup_vring(0, 64, base=BASE).driver.data_end = BASE + (4 << 20)
        fe.setup_vring(1, 64, base=BASE + (4 << 20))
        assert wait_until(lambda: all(v.queue is not None for v in be.vrings[:2]))
        yield dev, Driver(fe), outside, fe, be


def test_config_and_line_names(gpio):
    dev, drv, *_ = gpio
    ngpio, size = struct.unpack("<HxxI", dev.config())
    assert ngpio == 3 and size == len(b"led\0button\0reset\0")
    r = drv.call(GET_LINE_NAMES, 0, resp=1 + size)
    assert r == b"\0led\0button\0reset\0"


def test_output_line_reaches_the_outside(gpio):
    dev, drv, outside, *_ = gpio
    assert drv.call(SET_VALUE, LED, 1) == bytes([STATUS_OK, 0])
    assert outside("get", "led")["value"] == 0  # not an output yet: the outside level
    assert drv.call(SET_DIRECTION, LED, DIR_OUT) == bytes([STATUS_OK, 0])
    assert drv.call(GET_DIRECTION, LED) == bytes([STATUS_OK, DIR_OUT])
    got = outside("get", "led")
    assert got == {"ok": True, "line": 0, "name": "led", "value": 1, "direction": "out"}
    drv.call(SET_VALUE, LED, 0)
    assert outside("get", 0)["value"] == 0
    # the outside cannot drive a line the guest drives
    r = outside("set", "led", 1)
    assert not r["ok"] and "output the guest drives" in r["error"]


def test_input_line_reads_what_the_outside_drives(gpio):
    dev, drv, outside, *_ = gpio
    drv.call(SET_DIRECTION, BUTTON, DIR_IN)
    assert drv.call(GET_VALUE, BUTTON) == bytes([STATUS_OK, 0])
    assert outside("set", "button", 1)["ok"]
    assert drv.call(GET_VALUE, BUTTON) == bytes([STATUS_OK, 1])
    listing = control(dev.bank.ctl, {"op": "list"})
    assert [ln["name"] for ln in listing["lines"]] == NAMES


def test_rising_edge_interrupt_delivered_and_masked_again(gpio):
    dev, drv, outside, *_ = gpio
    drv.call(SET_DIRECTION, BUTTON, DIR_IN)
    assert drv.call(SET_IRQ_TYPE, BUTTON, IRQ_RISING) == bytes([STATUS_OK, 0])
    drv.unmask(BUTTON)
    assert drv.irqs(timeout=0.2) == []  # nothing happened yet: the pair waits
    t0 = time.monotonic()
    outside("set", "button", 1)
    got = drv.irqs()
    assert len(got) == 1 and got[0][1] == IRQ_VALID
    assert time.monotonic() - t0 < 0.5  # the change wakes the device; no backstop poll
    last, top = (int(x) for x in dev.snapshot()["irq_latency_us"].split()[1::2])
    assert 0 < last <= top < 500_000  # from the bank's change to the used entry
    # masked now (no pair queued): a falling edge is not latched for a rising-edge type,
    # a later rising edge is, and is delivered as soon as the driver unmasks
    outside("set", "button", 0)
    outside("set", "button", 1)
    drv.unmask(BUTTON)
    got = drv.irqs()
    assert len(got) == 1 and got[0][1] == IRQ_VALID
    drv.unmask(BUTTON)
    outside("set", "button", 0)
    assert drv.irqs(timeout=0.2) == []
    assert dev.stats.by_type["irqs"] == 2


def test_falling_and_both_edges(gpio):
    dev, drv, outside, *_ = gpio
    outside("set", "reset", 1)
    drv.call(SET_DIRECTION, RESET, DIR_IN)
    drv.call(SET_IRQ_TYPE, RESET, IRQ_FALLING)
    drv.unmask(RESET)
    outside("set", "reset", 0)
    assert [s for _, s in drv.irqs()] == [IRQ_VALID]
    drv.call(SET_IRQ_TYPE, RESET, IRQ_NONE)
    drv.call(SET_IRQ_TYPE, RESET, IRQ_BOTH)
    for level in (1, 0):
        drv.unmask(RESET)
        outside("set", "reset", level)
        assert [s for _, s in drv.irqs()] == [IRQ_VALID]


def test_level_interrupt_fires_while_active(gpio):
    dev, drv, outside, *_ = gpio
    drv.call(SET_DIRECTION, BUTTON, DIR_IN)
    outside("set", "button", 1)
    drv.call(SET_IRQ_TYPE, BUTTON, IRQ_HIGH)
    for _ in range(2):  # the level stays high: every unmask fires again
        drv.unmask(BUTTON)
        assert [s for _, s in drv.irqs()] == [IRQ_VALID]
    outside("set", "button", 0)
    drv.unmask(BUTTON)
    assert drv.irqs(timeout=0.2) == []
    outside("set", "button", 1)
    assert [s for _, s in drv.irqs()] == [IRQ_VALID]


def test_disabling_returns_the_waiting_pair_invalid(gpio):
    dev, drv, outside, *_ = gpio
    drv.call(SET_DIRECTION, BUTTON, DIR_IN)
    drv.call(SET_IRQ_TYPE, BUTTON, IRQ_RISING)
    drv.unmask(BUTTON)
    assert drv.call(SET_IRQ_TYPE, BUTTON, IRQ_NONE) == bytes([STATUS_OK, 0])
    assert [s for _, s in drv.irqs()] == [IRQ_INVALID]
    # unmasking a line whose interrupt is off: returned INVALID at once
    drv.unmask(BUTTON)
    assert [s for _, s in drv.irqs()] == [IRQ_INVALID]
    # an edge while disabled is not latched
    outside("set", "button", 1)
    outside("set", "button", 0)
    drv.call(SET_IRQ_TYPE, BUTTON, IRQ_RISING)
    drv.unmask(BUTTON)
    assert drv.irqs(timeout=0.2) == []


def test_hostile_requests_get_error_status_and_the_queue_goes_on(gpio):
    dev, drv, outside, *_ = gpio
    err = bytes([STATUS_ERR, 0])
    assert drv.call(GET_VALUE, 3) == err  # line ≥ ngpio
    assert drv.call(GET_VALUE, 0xFFFF) == err
    assert drv.call(0x77, 0) == err  # unknown type
    assert drv.call(0, 0) == err
    assert drv.call(SET_DIRECTION, LED, 7) == err
    assert drv.call(SET_VALUE, LED, 2) == err
    assert drv.call(SET_IRQ_TYPE, BUTTON, 5) == err
    assert drv.call(GET_VALUE, 0, readable=b"\x04\x00") == err  # short request
    assert drv.call(GET_VALUE, 0, readable=bytes(64)) == err  # long request
    assert drv.call(GET_VALUE, 0, resp=8)[:1] == bytes([STATUS_ERR])  # response too big
    assert drv.call(GET_LINE_NAMES, 0, resp=4)[:1] == bytes([STATUS_ERR])  # names too small
    assert drv.call(GET_VALUE, 0, resp=0) == b""  # nowhere to answer: completed empty
    drv.call(SET_DIRECTION, LED, DIR_OUT)
    assert drv.call(SET_IRQ_TYPE, LED, IRQ_RISING) == err  # IRQ on an output
    # eventq: bad line, bad sizes, duplicate pair → INVALID at once, nothing kept
    drv.call(SET_DIRECTION, BUTTON, DIR_IN)
    drv.call(SET_IRQ_TYPE, BUTTON, IRQ_RISING)
    drv.unmask(9)
    drv.unmask(BUTTON, readable=b"\x01")
    drv.unmask(BUTTON)
    drv.unmask(BUTTON)  # second pair for the same line
    got = drv.irqs(want=3)
    assert [s for _, s in got] == [IRQ_INVALID] * 3
    outside("set", "button", 1)
    assert [s for _, s in drv.irqs()] == [IRQ_VALID]  # the first pair still works
    by = dev.stats.by_type
    for key in ("bad_line", "bad_type", "bad_direction", "bad_value", "bad_irq_type",
                "bad_request_size", "bad_response_size", "bad_chain", "irq_on_output",
                "bad_event_chain", "event_duplicate"):  # fmt: skip
        assert by.get(key), (key, by)
    assert drv.call(GET_VALUE, BUTTON) == bytes([STATUS_OK, 1])
    assert gpio[4].snapshot()["broken"] == []


def test_irq_refused_without_the_feature(tmp_path):
    dev = parse_device("gpio:lines=a+b")
    with vhost_user(dev, tmp_path / "g.sock") as (fe, _):  # VIRTIO_GPIO_F_IRQ not acked
        fe.setup_vring(0, 64, base=BASE).driver.data_end = BASE + (4 << 20)
        fe.setup_vring(1, 64, base=BASE + (4 << 20))
        drv = Driver(fe)
        assert drv.call(SET_IRQ_TYPE, 0, IRQ_RISING) == bytes([STATUS_ERR, 0])
        assert dev.stats.by_type["irq_not_negotiated"] == 1


def test_stopping_the_eventq_drops_the_kept_pairs(gpio):
    dev, drv, outside, fe, be = gpio
    drv.call(SET_DIRECTION, BUTTON, DIR_IN)
    drv.call(SET_IRQ_TYPE, BUTTON, IRQ_RISING)
    drv.unmask(BUTTON)
    deadline = time.monotonic() + 5
    while dev.lines[BUTTON].event is None and time.monotonic() < deadline:
        time.sleep(0.005)
    fe.get_vring_base(1)  # QEMU stops the queue
    assert dev.lines[BUTTON].event is None
    outside("set", "button", 1)  # nothing to complete, nothing written
    time.sleep(0.1)
    assert drv.evq.get_used() == []


@pytest.mark.parametrize(
    "spec, message",
    [
        ("gpio", "gpio needs lines="),
        ("gpio:lines=a+a", "given twice"),
        ("gpio:lines=a b", "line name"),
        ("gpio:lines=a@3", "@OFFSET needs chip="),
        ("gpio:lines=a,chip=/dev/gpiochip0,ctl=/tmp/x", "ctl= drives a simulated bank"),
        ("gpio:lines=a,colour=red", "unknown gpio option"),
    ],
)
def test_bad_options_name_the_problem(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_device(spec)


def test_cdev_line_request_layout():
    """struct gpio_v2_line_request as include/uapi/linux/gpio.h lays it out (592 bytes)."""
    from edgevirt.backend.devices.gpiocdev import (
        FLAG_OUTPUT,
        GPIO_V2_GET_LINE_IOCTL,
        line_request,
        request_fd,
    )

    req = line_request(5, FLAG_OUTPUT, 1)
    assert len(req) == 592 and GPIO_V2_GET_LINE_IOCTL == 0xC250B407
    assert struct.unpack_from("<I", req, 0)[0] == 5
    assert req[256:269] == b"edgevirt-gpio"
    flags, nattrs = struct.unpack_from("<QI", req, 288)
    assert (flags, nattrs) == (FLAG_OUTPUT, 1)
    assert struct.unpack_from("<IIQQ", req, 320) == (2, 0, 1, 1)  # OUTPUT_VALUES, bit 0 set
    assert struct.unpack_from("<II", req, 560) == (1, 0)
    struct.pack_into("<i", req, 588, 42)
    assert request_fd(req) == 42


def test_reconnect_resets_the_lines_and_serves_the_new_front_end(gpio):
    """A front-end that goes away (QEMU restarting its chardev): the device resets, the
    guest's output is released on the wire, the kept event pair is dropped, and the next
    connection is served from a clean state."""
    dev, drv, outside, fe, be = gpio
    drv.call(SET_VALUE, LED, 1)
    drv.call(SET_DIRECTION, LED, DIR_OUT)
    drv.call(SET_DIRECTION, BUTTON, DIR_IN)
    drv.call(SET_IRQ_TYPE, BUTTON, IRQ_RISING)
    drv.unmask(BUTTON)
    assert outside("get", "led")["value"] == 1
    fe.close_socket()
    deadline = time.monotonic() + 5
    while be.conn is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    got = outside("get", "led")
    assert got["direction"] == "none" and got["value"] == 0, got
    assert all(ln.event is None and ln.irq_type == IRQ_NONE for ln in dev.lines)
    fe.reconnect(be.path)
    fe.negotiate(extra_features=1)
    fe.set_mem_table()
    fe.setup_vring(0, 64, base=BASE).driver.data_end = BASE + (4 << 20)
    fe.setup_vring(1, 64, base=BASE + (4 << 20))
    drv2 = Driver(fe)
    assert drv2.call(GET_DIRECTION, LED) == bytes([STATUS_OK, 0])
    drv2.call(SET_DIRECTION, BUTTON, DIR_IN)
    drv2.call(SET_IRQ_TYPE, BUTTON, IRQ_FALLING)
    drv2.unmask(BUTTON)
    outside("set", "button", 1)
    outside("set", "button", 0)
    assert [s for _, s in drv2.irqs()] == [IRQ_VALID]


def test_control_socket_survives_garbage(gpio):
    """The outside's socket is hostile too: bad JSON, wrong shapes, oversized lines get an
    error reply or a closed connection, and the bank keeps serving."""
    import socket as so

    dev, drv, outside, *_ = gpio
    ctl = str(dev.bank.ctl)
    for req in (b"not json\n", b"[1, 2]\n", b'{"op": "fly"}\n', b'{"op": "set", "line": 0}\n',
                b'{"op": "set", "line": true, "value": 1}\n',
                b'{"op": "get", "line": 99}\n'):  # fmt: skip
        with so.socket(so.AF_UNIX, so.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(ctl)
            s.sendall(req)
            reply = s.recv(4096)
            assert b'"ok": false' in reply, (req, reply)
    with so.socket(so.AF_UNIX, so.SOCK_STREAM) as s:  # no newline, too long: closed
        s.settimeout(5)
        s.connect(ctl)
        s.sendall(b"x" * 9000)
        try:
            assert s.recv(4096) == b""
        except ConnectionResetError:
            pass  # closed with our bytes unread: also a close
    assert outside("get", "button")["ok"]
    assert drv.call(GET_VALUE, BUTTON) == bytes([STATUS_OK, 0])


def test_random_requests_never_break_the_device(gpio):
    """Random request bytes and buffer shapes: every chain is answered or completed empty,
    the queue never breaks."""
    import random

    dev, drv, outside, fe, be = gpio
    rnd = random.Random(1234)
    for _ in range(300):
        typ = rnd.choice([0, 1, 2, 3, 4, 5, 6, 7, 0xFFFF])
        raw = struct.pack("<HHI", typ, rnd.choice([0, 1, 2, 3, 0xFFFF]), rnd.getrandbits(32))
        if rnd.random() < 0.2:
            raw = raw[: rnd.randrange(1, 8)] or b"\0"
        drv.call(typ, 0, resp=rnd.choice([0, 1, 2, 3, 40]), readable=raw)
    assert be.snapshot()["broken"] == []
    assert drv.call(GET_LINE_NAMES, 0, resp=1 + len(dev.names_block))[0] == STATUS_OK


class FakeChip:
    """The kernel side of the GPIO character device, for CdevBank: ioctls on a chip file
    and line requests whose fds are pipes (the test writes edge events into them)."""

    def __init__(self, names):
        self.names = names
        self.lines = {}  # read fd -> dict(offset, flags, value, wfd)
        self.busy = {3}  # offsets another consumer holds

    def ioctl(self, fd, req, buf, *_):
        from edgevirt.backend.devices import gpiocdev as c

        if req == c.GPIO_GET_CHIPINFO_IOCTL:
            buf[:] = c.CHIPINFO.pack(b"gpiochip7", b"ev-fake", len(self.names))
        elif req == c.GPIO_V2_GET_LINEINFO_IOCTL:
            off = struct.unpack_from("<I", buf, 64)[0]
            buf[0:32] = self.names[off].encode().ljust(32, b"\0")
        elif req == c.GPIO_V2_GET_LINE_IOCTL:
            import os

            off = struct.unpack_from("<I", buf, 0)[0]
            if off in self.busy:
                raise OSError(16, "Device or resource busy")
            r, w = os.pipe()
            flags, nattrs = struct.unpack_from("<QI", buf, 288)
            value = struct.unpack_from("<Q", buf, 328)[0] if nattrs else None
            self.lines[r] = {"offset": off, "flags": flags, "value": value, "wfd": w}
            struct.pack_into("<i", buf, 588, r)
        elif req == c.GPIO_V2_LINE_SET_VALUES_IOCTL:
            self.lines[fd]["value"] = struct.unpack_from("<Q", buf, 0)[0]
        elif req == c.GPIO_V2_LINE_GET_VALUES_IOCTL:
            struct.pack_into("<Q", buf, 0, self.lines[fd]["value"] or 0)
        else:
            raise OSError(25, "Inappropriate ioctl")
        return 0


class FakeHost:
    def __init__(self):
        self.readers = {}

    def add_reader(self, fd, cb):
        self.readers[fd] = cb

    def remove_reader(self, fd):
        self.readers.pop(fd, None)


def test_cdev_bank_requests_lines_and_turns_edge_events_into_levels(tmp_path, monkeypatch):
    import os

    from edgevirt.backend.devices import gpiocdev as c

    chip = FakeChip(["", "sensor", "relay", ""])
    monkeypatch.setattr(c.fcntl, "ioctl", chip.ioctl)
    dev_file = tmp_path / "gpiochip7"
    dev_file.write_bytes(b"")
    with pytest.raises(ConfigError, match="has no line of that name"):
        c.CdevBank(str(dev_file), [("nosuch", None)])
    with pytest.raises(ConfigError, match="has 4 lines"):
        c.CdevBank(str(dev_file), [("x", 9)])
    bank = c.CdevBank(str(dev_file), [("sensor", None), ("relay", None), ("spare", 3)])
    assert bank.offsets == [1, 2, 3] and list(bank.names) == ["sensor", "relay", "spare"]
    host, seen = FakeHost(), []
    bank.attach(host, lambda line, level, ts: seen.append((line, level, ts)))
    # in: input with both edges, its fd watched; events become levels
    bank.set_direction(0, DIR_IN, 0)
    [(fd, line)] = [(fd, v) for fd, v in chip.lines.items()]
    assert line["offset"] == 1 and line["flags"] == c.FLAG_INPUT | c.FLAG_EDGE_RISING | \
        c.FLAG_EDGE_FALLING  # fmt: skip
    for ident in (1, 2, 1):
        os.write(line["wfd"], c.LINE_EVENT.pack(123, ident, 1, 1, 1, bytes(24)))
    host.readers[fd]()
    assert seen == [(0, 1, 123), (0, 0, 123), (0, 1, 123)]  # the kernel's timestamps
    # out: an output with the guest's value, then set_value
    bank.set_direction(1, DIR_OUT, 1)
    out_fd = max(chip.lines)
    assert chip.lines[out_fd]["flags"] == c.FLAG_OUTPUT and chip.lines[out_fd]["value"] == 1
    bank.set_value(1, 0)
    assert chip.lines[out_fd]["value"] == 0 and bank.get_value(1) == 0
    with pytest.raises(GpioError, match="not an output"):
        bank.set_value(0, 1)
    # release: fd closed and no longer watched
    bank.set_direction(0, DIR_NONE, 0)
    assert fd not in host.readers
    with pytest.raises(OSError):
        os.fstat(fd)
    assert bank.describe() == f"{dev_file} (ev-fake) offsets 1,2,3, 1 requested"
    with pytest.raises(GpioError, match="offset 3: request: Device or resource busy"):
        bank.set_direction(2, DIR_IN, 0)
    bank.close()
