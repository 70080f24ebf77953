"""virtio-i2c with simulated devices (AT24C02-like EEPROM, register map), through the real
vhost-user back-end and a synthetic driver that queues requests the way Linux's
virtio-i2c driver does (one chain per segment, FAIL_NEXT on all but a group's last)."""

import struct
import time

import pytest

from edgevirt.backend.devices import parse_device
from edgevirt.backend.devices.i2c import FLAG_FAIL_NEXT, FLAG_M_RD, MAX_GROUP, MSG_ERR, MSG_OK
from edgevirt.backend.devices.i2csim import WHO_AM_I_VALUE
from edgevirt.errors import ConfigError
from tests.helpers import chain_bufs, vhost_user, wait_until

BASE = 0x5C000000
EEPROM, REGMAP, HIDDEN = 0x50, 0x48, 0x51


def w(addr, data=b""):
    return ("w", addr, data)


def r(addr, n):
    return ("r", addr, n)


class Driver:
    def __init__(self, fe):
        self.fe = fe
        self.q = fe.vrings[0].driver

    def transfer(self, *msgs, raw=None, timeout=5.0):
        """Queue one group; returns [(status, data)] in order."""
        heads = []
        for i, (kind, addr, x) in enumerate(msgs):
            flags = (FLAG_FAIL_NEXT if i + 1 < len(msgs) else 0) | (FLAG_M_RD if kind == "r" else 0)
            hdr = struct.pack("<HHI", addr << 1, 0, flags)
            if kind == "w":
                h = self.q.add([hdr, x] if x else [hdr], [1], publish=False)
            else:
                h = self.q.add([hdr], [x, 1] if x else [1], publish=False)
            heads.append((h, chain_bufs(self.q, h)))
        for h, bufs in raw or []:
            heads.append((h, bufs))
        self.q.publish()
        self.fe.kick(0)
        return self.collect(heads, timeout)

    def raw(self, readable, writable):
        h = self.q.add(readable, writable, publish=False)
        return h, chain_bufs(self.q, h)

    def collect(self, heads, timeout=5.0):
        got = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(heads) and time.monotonic() < deadline:
            self.fe.wait_call(0, 0.1)
            for h, n in self.q.get_used():
                got[h] = n
        out = []
        for h, bufs in heads:
            if h not in got:
                out.append(None)
                continue
            wbufs = [b for b in bufs if b[2] & 2]
            if not wbufs:
                out.append(("none", b""))
                continue
            status = self.q.read(wbufs[-1][0] + wbufs[-1][1] - 1, 1)[0]
            data = b"".join(self.q.read(a, n) for a, n, _ in wbufs)[:-1]
            out.append((status, data))
        return out


@pytest.fixture
def i2c(tmp_path):
    image = tmp_path / "eeprom.bin"
    dev = parse_device(f"i2c:devices=eeprom@0x50+regmap@0x48+eeprom@0x51,allow=0x50+0x48,"
                       f"eeprom_file={image}")  # fmt: skip
    # VIRTIO_I2C_F_ZERO_LENGTH_REQUEST
    with vhost_user(dev, tmp_path / "i2c.sock", features=1) as (fe, be):
        fe.setup_vring(0, 256, base=BASE)
        assert wait_until(lambda: be.vrings[0].queue is not None)
        yield dev, Driver(fe), be, image


def test_offers_zero_length_requests_and_no_config(i2c):
    dev, *_ = i2c
    assert dev.features & 1 and dev.config() == b""


def test_eeprom_byte_write_then_random_read(i2c):
    dev, drv, _, image = i2c
    # i2cset -y 0 0x50 0x10 0xab: one write [word address, data]
    assert drv.transfer(w(EEPROM, b"\x10\xab")) == [(MSG_OK, b"")]
    # i2cget -y 0 0x50 0x10: write [word address] then read 1 (one group)
    assert drv.transfer(w(EEPROM, b"\x10"), r(EEPROM, 1)) == [(MSG_OK, b""), (MSG_OK, b"\xab")]
    assert image.read_bytes()[0x10] == 0xAB  # the back-end side keeps the value
    assert dev.bus.devices[EEPROM].mem[0x10] == 0xAB
    assert dev.snapshot() == {"allow": "0x48 0x50", "group_waiting": 0,
                              "bus": "simulated regmap@0x48 eeprom@0x50 eeprom@0x51"}  # fmt: skip


def test_eeprom_page_write_wraps_inside_the_page_and_reads_are_sequential(i2c):
    dev, drv, *_ = i2c
    # 10 bytes from 0x1e: page 0x18..0x1f; 0x1e, 0x1f, then wrap to 0x18..0x1f
    data = bytes(range(1, 11))
    assert drv.transfer(w(EEPROM, b"\x1e" + data)) == [(MSG_OK, b"")]
    [_, (st, got)] = drv.transfer(w(EEPROM, b"\x18"), r(EEPROM, 9))
    assert st == MSG_OK
    # 0x18..0x1f: bytes 3..10 landed at 0x18..0x1f, then 9 and 10 overwrote 0x18, 0x19? no:
    # sequence 1→1e, 2→1f, 3→18, 4→19, ..., 10→1f (overwrites 2); 0x20 untouched (0xff)
    assert got == bytes([3, 4, 5, 6, 7, 8, 9, 10, 0xFF])
    # current-address read continues where the last read stopped (0x21), a read across
    # the end of the array wraps to 0
    assert drv.transfer(r(EEPROM, 1)) == [(MSG_OK, b"\xff")]
    drv.transfer(w(EEPROM, b"\x00\x5a"))
    [_, (st, got)] = drv.transfer(w(EEPROM, b"\xff"), r(EEPROM, 2))
    assert got == b"\xff\x5a"


def test_regmap_auto_increment_and_read_only_id(i2c):
    dev, drv, *_ = i2c
    [_, (st, got)] = drv.transfer(w(REGMAP, b"\x0f"), r(REGMAP, 1))
    assert (st, got) == (MSG_OK, bytes([WHO_AM_I_VALUE]))
    drv.transfer(w(REGMAP, b"\x0e\x11\x22\x33"))  # 0x0f (WHO_AM_I) ignores the write
    [_, (st, got)] = drv.transfer(w(REGMAP, b"\x0e"), r(REGMAP, 3))
    assert got == bytes([0x11, WHO_AM_I_VALUE, 0x33])


def test_quick_probe_answers_only_allowed_addresses(i2c):
    dev, drv, *_ = i2c
    # i2cdetect: a zero-length write per address (SMBus quick); 0x51 has a device but is
    # not in the allow-list, 0x60 has none
    found = [a for a in range(0x03, 0x78) if drv.transfer(w(a))[0][0] == MSG_OK]
    assert found == [REGMAP, EEPROM]
    # zero-length read (M_RD without a buffer) too
    assert drv.transfer(r(EEPROM, 0)) == [(MSG_OK, b"")]
    assert dev.stats.by_type["address_not_allowed"] == 117 - 2


def test_not_allowed_address_fails_the_whole_group_without_touching_the_bus(i2c):
    dev, drv, *_ = i2c
    before = dev.bus.devices[HIDDEN].mem[:]
    got = drv.transfer(w(EEPROM, b"\x00"), w(HIDDEN, b"\x00\x99"), r(EEPROM, 1))
    assert [s for s, _ in got] == [MSG_ERR] * 3
    assert dev.bus.devices[HIDDEN].mem == before
    assert dev.stats.by_type["group_refused"] == 1


def test_nack_fails_from_that_message_on(tmp_path):
    dev = parse_device("i2c:devices=eeprom@0x50,allow=0x50+0x52")
    from edgevirt.backend.devices.i2c import Msg

    msgs = [Msg(0x50, False, 2, b"\x00\x01"), Msg(0x52, True, 1), Msg(0x50, True, 1)]
    with pytest.raises(Exception) as e:
        dev.bus.transfer(msgs)
    assert getattr(e.value, "index", None) == 1
    assert dev.bus.devices[0x50].mem[0] == 1  # the first message did happen


def test_hostile_requests_error_status_queue_goes_on(i2c):
    dev, drv, be, _ = i2c
    hdr = struct.pack("<HHI", EEPROM << 1, 0, 0)
    rd = struct.pack("<HHI", EEPROM << 1, 0, FLAG_M_RD)
    cases = {
        "short header": drv.raw([b"\xa0\x00"], [1]),
        "reserved flags": drv.raw([struct.pack("<HHI", EEPROM << 1, 0, 0x80)], [1]),
        "odd address": drv.raw([struct.pack("<HHI", (EEPROM << 1) | 1, 0, 0)], [1]),
        "10-bit address": drv.raw([struct.pack("<HHI", 0x12F2, 0, 0)], [1]),
        "write with writable data": drv.raw([hdr], [4, 1]),
        "read with readable data": drv.raw([rd, b"\x00"], [1]),
        "segment too long": drv.raw([hdr, bytes(8193)], [1]),
        "no status byte": drv.raw([hdr, b"\x00"], []),
    }
    drv.q.publish()
    drv.fe.kick(0)
    got = dict(zip(cases, drv.collect(list(cases.values())), strict=True))
    for name, res in got.items():
        if name == "no status byte":
            assert res == ("none", b""), res
        else:
            assert res is not None and res[0] == MSG_ERR, (name, res)
    by = dev.stats.by_type
    for key in ("bad_header", "bad_flags", "bad_address", "ten_bit_address", "bad_direction",
                "bad_length", "bad_chain"):  # fmt: skip
        assert by.get(key), (key, by)
    # the queue still serves
    assert drv.transfer(w(EEPROM, b"\x10"), r(EEPROM, 1))[1][0] == MSG_OK
    assert be.snapshot()["broken"] == []


def test_group_longer_than_the_limit_fails(i2c):
    dev, drv, *_ = i2c
    msgs = [w(EEPROM, b"\x00")] * (MAX_GROUP + 2)
    got = drv.transfer(*msgs)
    assert [s for s, _ in got[:MAX_GROUP]] == [MSG_ERR] * MAX_GROUP
    assert dev.stats.by_type["group_too_long"] == 1
    assert got[-1][0] == MSG_OK  # the tail is a group of its own


def test_unfinished_group_is_kept_then_dropped_when_the_queue_stops(i2c):
    dev, drv, be, _ = i2c
    hdr = struct.pack("<HHI", EEPROM << 1, 0, FLAG_FAIL_NEXT)
    h = drv.raw([hdr, b"\x00"], [1])
    drv.q.publish()
    drv.fe.kick(0)
    assert drv.collect([h], timeout=0.3) == [None]  # waits for the rest of its group
    deadline = time.monotonic() + 5
    while not dev.group and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(dev.group) == 1
    drv.fe.get_vring_base(0)
    assert dev.group == []


@pytest.mark.parametrize(
    "spec, message",
    [
        ("i2c", "i2c needs devices="),
        ("i2c:devices=flash@0x50", "KIND@ADDRESS"),
        ("i2c:devices=eeprom@0x50+regmap@0x50", "two devices at 0x50"),
        ("i2c:devices=eeprom@0x80", "outside 0x03..0x77"),
        ("i2c:devices=eeprom@0x50,allow=0x300", "10-bit addresses are not supported"),
        ("i2c:bus=/dev/i2c-0", "needs allow="),
        ("i2c:bus=/dev/i2c-0,devices=eeprom@0x50,allow=0x50", "give one or the other"),
    ],
)
def test_bad_options_name_the_problem(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_device(spec)


# -- the real adapter's SMBus translation (i2c-stub is SMBus-only) -------------------------


def _msgs(*spec):
    from edgevirt.backend.devices.i2c import Msg

    return [Msg(0x50, k == "r", n if k == "r" else len(n), b"" if k == "r" else n)
            for k, n in spec]  # fmt: skip


@pytest.mark.parametrize(
    "group, plan",
    [
        ((("w", b""),), (0, 0, 0, b"", 0)),  # quick write (i2cdetect)
        ((("r", 0),), (1, 0, 0, b"", 0)),  # quick read
        ((("r", 1),), (1, 0, 1, b"", 1)),  # receive byte (i2cdetect on 0x50..0x5f)
        ((("w", b"\x10"),), (0, 0x10, 1, b"", 0)),  # send byte
        ((("w", b"\x10\xab"),), (0, 0x10, 2, b"\xab", 0)),  # i2cset: write byte data
        ((("w", b"\x10\x01\x02"),), (0, 0x10, 3, b"\x01\x02", 0)),  # write word data
        ((("w", b"\x10" + bytes(8)),), (0, 0x10, 8, b"\x08" + bytes(8), 0)),  # i2c block
        ((("w", b"\x10"), ("r", 1)), (1, 0x10, 2, b"", 1)),  # i2cget: read byte data
        ((("w", b"\x10"), ("r", 2)), (1, 0x10, 3, b"", 2)),  # read word data
        ((("w", b"\x10"), ("r", 16)), (1, 0x10, 8, b"\x10", 16)),  # read i2c block
    ],
)
def test_smbus_translation(group, plan):
    from edgevirt.backend.devices.i2cdev import smbus_plan

    assert smbus_plan(_msgs(*group)) == plan


@pytest.mark.parametrize(
    "group",
    [
        (("w", b"\x10" + bytes(40)),),  # longer than an SMBus block
        (("r", 3),),  # a bare multi-byte read
        (("w", b"\x10\x11"), ("r", 1)),  # two-byte register address
        (("w", b"\x10"), ("r", 1), ("r", 1)),
    ],
)
def test_groups_without_smbus_equivalent_fail(group):
    from edgevirt.backend.devices.i2c import I2cError
    from edgevirt.backend.devices.i2cdev import smbus_plan

    with pytest.raises(I2cError, match="no SMBus equivalent"):
        smbus_plan(_msgs(*group))


def test_random_requests_never_break_the_device(i2c):
    """Random headers, flags, addresses and buffer shapes, groups left open included: the
    queue never breaks and a well-formed transfer afterwards still works."""
    import random

    dev, drv, be, _ = i2c
    rnd = random.Random(4321)
    for _ in range(40):
        heads = []
        for _ in range(rnd.randrange(1, 4)):
            addr = rnd.choice([EEPROM << 1, REGMAP << 1, HIDDEN << 1, rnd.getrandbits(16)])
            flags = rnd.choice([0, 1, 2, 3, rnd.getrandbits(32)])
            hdr = struct.pack("<HHI", addr, rnd.getrandbits(16), flags)
            if rnd.random() < 0.2:
                hdr = hdr[: rnd.randrange(1, 8)]
            readable = [hdr] + ([bytes(rnd.randrange(1, 40))] if rnd.random() < 0.5 else [])
            writable = [rnd.randrange(1, 40)] * rnd.randrange(0, 3)
            heads.append(drv.raw(readable, writable))
        drv.q.publish()
        drv.fe.kick(0)
        drv.collect(heads, timeout=0.3)  # some wait for their group's end: fine
    drv.fe.get_vring_base(0)  # stop the queue: open groups are dropped
    assert dev.group == [] and be.snapshot()["broken"] == []


def test_i2c_dev_ioctl_layouts():
    """struct i2c_msg, i2c_rdwr_ioctl_data and i2c_smbus_ioctl_data as on 64-bit Linux."""
    import ctypes

    from edgevirt.backend.devices import i2cdev

    assert ctypes.sizeof(i2cdev._I2cMsg) == 16 and i2cdev._I2cMsg.buf.offset == 8
    assert ctypes.sizeof(i2cdev._RdwrData) == 16 and i2cdev._RdwrData.nmsgs.offset == 8
    assert ctypes.sizeof(i2cdev._SmbusData) == 16 and i2cdev._SmbusData.size.offset == 4
    assert i2cdev._SmbusData.data.offset == 8


def test_linux_bus_plain_i2c_passes_a_group_as_one_i2c_rdwr(tmp_path, monkeypatch):
    """An adapter with I2C_FUNC_I2C: the group reaches the kernel as one I2C_RDWR whose
    messages point at buffers the kernel fills (emulated here through the pointers)."""
    import ctypes

    from edgevirt.backend.devices import i2cdev
    from edgevirt.backend.devices.i2c import I2cError, Msg

    mem = bytearray(range(256))
    calls = []

    def ioctl(fd, req, arg, *_):
        if req == i2cdev.I2C_FUNCS:
            arg[:8] = (1).to_bytes(8, "little")  # I2C_FUNC_I2C
            return 0
        assert req == i2cdev.I2C_RDWR
        data = i2cdev._RdwrData.from_buffer_copy(bytes(arg))
        msgs = (i2cdev._I2cMsg * data.nmsgs).from_address(data.msgs)
        calls.append([(m.addr, m.flags, m.len) for m in msgs])
        ptr = 0
        for m in msgs:
            if m.addr != 0x50:
                raise OSError(6, "No such device or address")
            if m.flags & i2cdev.I2C_M_RD:
                ctypes.memmove(m.buf, bytes(mem[ptr : ptr + m.len]), m.len)
            elif m.len:
                raw = ctypes.string_at(m.buf, m.len)
                ptr = raw[0]
                mem[ptr : ptr + m.len - 1] = raw[1:]
        return len(msgs)

    monkeypatch.setattr(i2cdev.fcntl, "ioctl", ioctl)
    dev = tmp_path / "i2c-3"
    dev.write_bytes(b"")
    bus = i2cdev.LinuxBus(str(dev))
    assert bus.plain_i2c and bus.describe() == f"{dev} (i2c)"
    msgs = [Msg(0x50, False, 3, b"\x10\xaa\xbb"), Msg(0x50, False, 1, b"\x0f"),
            Msg(0x50, True, 4)]  # fmt: skip
    bus.transfer(msgs)
    assert calls == [[(0x50, 0, 3), (0x50, 0, 1), (0x50, 1, 4)]]
    assert msgs[2].data == bytes([0x0F, 0xAA, 0xBB, 0x12])
    bus.transfer([Msg(0x50, False, 0, b""), Msg(0x50, True, 0)])  # zero-length both ways
    assert calls[-1] == [(0x50, 0, 0), (0x50, 1, 0)]
    with pytest.raises(I2cError, match="I2C_RDWR: No such device"):
        bus.transfer([Msg(0x51, True, 1)])
    bus.close()
