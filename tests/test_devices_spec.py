"""The back-end spec's [[device]] tables for net, vsock and console: validated options."""

import pytest

from edgevirt.backend.config import load_backend_spec
from edgevirt.backend.devices.console import ConsoleDevice
from edgevirt.backend.devices.vsock import VsockDevice
from edgevirt.errors import ConfigError


def spec(tmp_path, text):
    p = tmp_path / "b.toml"
    p.write_text('[vhost_user]\nsocket_dir = "s"\n' + text)
    return p


def test_vsock_and_console_tables_open_devices(tmp_path):
    (tmp_path / "v").mkdir()
    (tmp_path / "c").mkdir()
    s = load_backend_spec(spec(tmp_path, '[[device]]\ntype = "vsock"\ncid = 5\ndir = "v"\n'
                               '[[device]]\ntype = "console"\nports = ["log", "ctl"]\n'
                               'console = "log"\ndir = "c"\n'))  # fmt: skip
    vs, con = (d.open() for d in s.devices)
    try:
        assert isinstance(vs, VsockDevice) and vs.cid == 5 and vs.dir == tmp_path / "v"
        assert isinstance(con, ConsoleDevice) and [p.name for p in con.ports] == ["log", "ctl"]
        assert con.ports[0].console and (tmp_path / "c" / "ctl.sock").exists()
    finally:
        vs.close()
        con.close()


@pytest.mark.parametrize(
    "text, message",
    [
        ('type = "net"\n', r"\[\[device\]\]\[0\]: missing key 'tap'"),
        ('type = "net"\ntap = "t"\ncolour = 1\n', r"\[0\] \(net\): unknown key\(s\) colour"),
        ('type = "vsock"\ncid = "3"\ndir = "."\n', r"\[0\].cid: expected int"),
        ('type = "console"\nports = []\ndir = "."\n', r"\[0\].ports: expected a non-empty"),
        ('type = "console"\nports = ["a"]\nconsole = "b"\ndir = "."\n', r"console: 'b' is not"),
    ],
)
def test_bad_tables_name_file_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_backend_spec(spec(tmp_path, "[[device]]\n" + text))


def test_net_option_errors_come_from_opening(tmp_path):
    s = load_backend_spec(spec(tmp_path, '[[device]]\ntype = "net"\ntap = "t"\nmac = "zz"\n'))
    with pytest.raises(ConfigError, match="six hex bytes"):
        s.devices[0].open()


@pytest.mark.parametrize(
    "device, code, message",
    [
        ("net:tap=x,netns=edgevirt-no-such-ns", 3, "network namespace edgevirt-no-such-ns"),
        ("net:tap=waytoolongname12345", 4, "tap name 'waytoolongname12345'"),
        ("vsock:cid=1,dir=DIR", 4, "a guest CID is 3..2^32-2"),
        ("console:ports=a/b,dir=DIR", 4, "port name 'a/b'"),
        ("net:tap=x,offload=maybe", 4, "offload='maybe', expected on or off"),
    ],
)
def test_backend_run_device_errors_exit_codes(tmp_path, device, code, message):
    from helpers import edgevirt, flat

    r = edgevirt("backend", "run", "--device", device.replace("DIR", str(tmp_path)),
                 "--socket-dir", str(tmp_path), timeout=60)  # fmt: skip
    assert r.returncode == code, r.stderr
    assert message in flat(r.stderr)


def test_example_system_spec_with_the_communication_devices_composes(tmp_path):
    """devicetree/specs/qemu-virt-comm.toml: net and vsock on virtio-mmio nodes with the
    carve-out pool, console on the virtio-msg bus node."""
    import json

    from helpers import ROOT, edgevirt

    spec = ROOT / "devicetree" / "specs" / "qemu-virt-comm.toml"
    r = edgevirt("dt", "compose", "--board", "qemu-virt", "--spec", str(spec), "-o",
                 str(tmp_path), "--json", timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert set(plan["mmio"]) == {"0", "1"} and plan["msg_nodes"] == {"guest": "/virtio-msg@c000000"}
    dts = (tmp_path / "guest.dts").read_text()
    for node in plan["mmio"].values():
        block = dts[dts.index(f'target-path = "{node}"') :]
        assert "memory-region = <&edgevirt_shared>" in block[:200]
