"""gpio and i2c as a user runs them: `edgevirt backend run` (vhost-user and virtio-msg),
`edgevirt backend gpio get|set|list` against the running back-end, [[device]] tables."""

import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest

from edgevirt.backend.config import load_backend_spec
from edgevirt.backend.devices import gpio as g
from edgevirt.backend.devices import i2c
from edgevirt.backend.devices.gpio import GpioDevice
from edgevirt.backend.devices.i2c import I2cDevice
from edgevirt.backend.transport.vhost_user.frontend import VhostUserFrontend
from edgevirt.backend.transport.virtio_msg import protocol as p
from edgevirt.backend.transport.virtio_msg.driver import MsgDriver
from edgevirt.backend.transport.virtio_msg.service import map_carveout
from edgevirt.backend.virtq.driver import DriverQueue
from edgevirt.errors import ConfigError

BASE = 0x5C00_0000
CARVEOUT = 2 << 20


def run_backend(args):
    return subprocess.Popen([sys.executable, "-m", "edgevirt", "backend", "run", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def stop(proc):
    try:
        os.kill(proc.pid, signal.SIGTERM)
        return proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def gpio_cli(*args):
    return subprocess.run([sys.executable, "-m", "edgevirt", "backend", "gpio", *args],
                          capture_output=True, text=True, timeout=30)  # fmt: skip


def call(fe, q, typ, line, value=0):
    drv = fe.vrings[q].driver
    h = drv.add([struct.pack("<HHI", typ, line, value)], [2])
    fe.kick(q)
    assert fe.wait_call(q, 5)
    [(head, n)] = drv.get_used()
    addr = drv.read_desc(drv.read_desc(h)[3])[0]
    return drv.read(addr, n)


def test_run_serves_gpio_and_i2c_and_the_cli_drives_the_bank(tmp_path):
    ctl = tmp_path / "gpio.sock"
    proc = run_backend(["--device", f"gpio:lines=led+button,ctl={ctl}",
                        "--device", "i2c:devices=eeprom@0x50+regmap@0x48,allow=0x50",
                        "--socket-dir", str(tmp_path / "s"), "--json"])  # fmt: skip
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert set(ready["sockets"]) == {"gpio", "i2c"}
        fe = VhostUserFrontend(ready["sockets"]["gpio"], size=4 << 20)
        fe.negotiate(extra_features=1)
        assert struct.unpack("<HxxI", fe.get_config(8)) == (2, len(b"led\0button\0"))
        fe.set_mem_table()
        fe.setup_vring(0, 16, base=BASE).driver.data_end = BASE + (1 << 20)
        fe.setup_vring(1, 16, base=BASE + (1 << 20))
        assert call(fe, 0, g.SET_VALUE, 0, 1) == b"\0\0"
        assert call(fe, 0, g.SET_DIRECTION, 0, g.DIR_OUT) == b"\0\0"
        r = gpio_cli("get", "--ctl", str(ctl), "led")
        assert r.returncode == 0 and r.stdout.strip() == "1", r
        # an edge from outside reaches the driver's unmasked pair
        call(fe, 0, g.SET_DIRECTION, 1, g.DIR_IN)
        call(fe, 0, g.SET_IRQ_TYPE, 1, g.IRQ_RISING)
        ev = fe.vrings[1].driver
        ev.add([struct.pack("<H", 1)], [1])
        fe.kick(1)
        r = gpio_cli("set", "--ctl", str(ctl), "button", "1")
        assert r.returncode == 0, r
        assert fe.wait_call(1, 5)
        [(_, n)] = ev.get_used()
        assert n == 1
        r = gpio_cli("list", "--ctl", str(ctl), "--json")
        lines = json.loads(r.stdout)["lines"]
        assert [(ln["name"], ln["direction"], ln["value"]) for ln in lines] == [
            ("led", "out", 1), ("button", "in", 1)]  # fmt: skip
        r = gpio_cli("set", "--ctl", str(ctl), "led", "0")
        assert r.returncode == 1 and "output the guest drives" in r.stderr, r
        r = gpio_cli("get", "--ctl", str(ctl), "nosuch")
        assert r.returncode == 1 and "no such line" in r.stderr, r
        fe.close()
    finally:
        out, err = stop(proc)
    final = json.loads(out)  # the ready line was read already
    gpio_stats = final["devices"][0]
    assert gpio_stats["device"] == "gpio" and gpio_stats["by_type"]["irqs"] == 1, gpio_stats


def test_gpio_cli_without_a_backend_fails_clearly(tmp_path):
    r = gpio_cli("get", "--ctl", str(tmp_path / "none.sock"), "led")
    assert r.returncode == 1 and "gpio control socket" in r.stderr, r


def test_gpio_and_i2c_over_virtio_msg(tmp_path):
    """The same devices behind the virtio-msg bus (the service VM's transport): an EEPROM
    write and read-back, a GPIO edge completing a deferred event pair."""
    carve = tmp_path / "carveout"
    with open(carve, "wb") as f:
        f.truncate(CARVEOUT)
    ctl = tmp_path / "gpio.sock"
    spec = tmp_path / "b.toml"
    spec.write_text(f'transport = "msg"\n[msg]\nsocket = "bus.sock"\ncarveout_file = "{carve}"\n'
                    f"carveout_base = {BASE:#x}\n"
                    '[[device]]\ntype = "i2c"\ndevices = ["eeprom@0x50"]\n'
                    '[[device]]\ntype = "gpio"\nlines = ["led", "button"]\n'
                    f'ctl = "{ctl}"\n')  # fmt: skip
    proc = run_backend(["--spec", str(spec), "--json"])
    mem = map_carveout(carve, BASE)
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert ready["devices"] == ["i2c", "gpio"]
        with MsgDriver(ready["bus"], mem) as drv:
            # dev 0: i2c — write 0x5a at 0x20, then read it back in a write+read group
            assert drv.negotiate(0, drv.features(0) & ~(1 << 29)) & p.STATUS_FEATURES_OK
            q = DriverQueue(mem, 16, base=BASE)
            q.data_end = BASE + (512 << 10)
            drv.setup_queue(0, 0, q)
            assert drv.driver_ok(0) & p.STATUS_DRIVER_OK
            q.add([struct.pack("<HHI", 0x50 << 1, 0, 0), b"\x20\x5a"], [1])
            drv.kick(0, 0)
            drv.wait_used(0, 0)
            assert [n for _, n in q.get_used()] == [1]
            q.add([struct.pack("<HHI", 0x50 << 1, 0, i2c.FLAG_FAIL_NEXT), b"\x20"], [1])
            h = q.add([struct.pack("<HHI", 0x50 << 1, 0, i2c.FLAG_M_RD)], [1, 1])
            drv.kick(0, 0)
            used = {}
            deadline = time.monotonic() + 5
            while len(used) < 2 and time.monotonic() < deadline:
                drv.wait_used(0, 0)
                used.update(q.get_used())
            data_addr = q.read_desc(q.read_desc(h)[3])[0]
            assert q.read(data_addr, 2) == b"\x5a\x00"  # data 0x5a, status OK
            # dev 1: gpio — an edge from outside completes the unmasked pair
            assert drv.negotiate(1, drv.features(1) & ~(1 << 29)) & p.STATUS_FEATURES_OK
            rq = DriverQueue(mem, 16, base=BASE + (1 << 20))
            rq.data_end = BASE + (1 << 20) + (256 << 10)
            eq = DriverQueue(mem, 16, base=BASE + (1 << 20) + (256 << 10))
            drv.setup_queue(1, 0, rq)
            drv.setup_queue(1, 1, eq)
            assert drv.driver_ok(1) & p.STATUS_DRIVER_OK
            for typ, value in ((g.SET_DIRECTION, g.DIR_IN), (g.SET_IRQ_TYPE, g.IRQ_BOTH)):
                rq.add([struct.pack("<HHI", typ, 1, value)], [2])
                drv.kick(1, 0)
                drv.wait_used(1, 0)
                assert len(rq.get_used()) == 1
            eq.add([struct.pack("<H", 1)], [1])
            drv.kick(1, 1)
            time.sleep(0.1)
            assert eq.get_used() == []
            r = gpio_cli("set", "--ctl", str(ctl), "button", "1")
            assert r.returncode == 0, r
            drv.wait_used(1, 1)
            assert [n for _, n in eq.get_used()] == [1]
    finally:
        mem.close()
        out, _ = stop(proc)
    final = json.loads(out)
    assert final["protocol_errors"] == 0
    by = {d["device"]: d for d in final["devices"]}
    assert by["gpio"]["by_type"]["irqs"] == 1 and by["i2c"]["by_type"]["read"] == 1


def spec(tmp_path, text):
    f = tmp_path / "b.toml"
    f.write_text('[vhost_user]\nsocket_dir = "s"\n' + text)
    return f


def test_spec_tables_open_gpio_and_i2c(tmp_path):
    s = load_backend_spec(spec(tmp_path, '[[device]]\ntype = "gpio"\nlines = ["led", "btn"]\n'
                               'ctl = "g.sock"\n[[device]]\ntype = "i2c"\n'
                               'devices = ["eeprom@0x50", "regmap@0x48"]\nallow = [0x50]\n'
                               'eeprom_file = "ee.bin"\n'))  # fmt: skip
    gp, ic = (d.open() for d in s.devices)
    try:
        assert isinstance(gp, GpioDevice) and list(gp.bank.names) == ["led", "btn"]
        assert (tmp_path / "g.sock").exists()
        assert isinstance(ic, I2cDevice) and ic.allow == {0x50}
        assert sorted(ic.bus.devices) == [0x48, 0x50]  # type: ignore[attr-defined]
    finally:
        gp.close()
        ic.close()


@pytest.mark.parametrize(
    "text, message",
    [
        ('type = "gpio"\n', r"\[0\]: missing key 'lines'"),
        ('type = "gpio"\nlines = []\n', r"\[0\].lines: expected a non-empty list"),
        ('type = "gpio"\nlines = ["a"]\npins = 3\n', r"\(gpio\): unknown key\(s\) pins"),
        ('type = "i2c"\ndevices = ["eeprom@0x50"]\nallow = [0x50, 0x99]\n', "0x99 is outside"),
        ('type = "i2c"\nbus = "/dev/i2c-7"\n', "needs allow="),
        ('type = "gpio"\nlines = ["a@3"]\nchip = "nosuch"\n', "no /dev/gpiochip. with that label"),
        ('type = "i2c"\nbus = "nosuch"\nallow = [0x50]\n', "bus=nosuch: no adapter of that name"),
        ('type = "i2c"\nbus = "/dev/nonexistent-i2c"\nallow = [0x50]\n', "No such file"),
    ],
)
def test_bad_tables_name_file_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        s = load_backend_spec(spec(tmp_path, "[[device]]\n" + text))
        s.devices[0].open()
