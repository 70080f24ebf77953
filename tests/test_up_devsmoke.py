"""`edgevirt up --spec` with devices beyond blk and rng: which specs it accepts, and how
the QEMU machine wires each device's smoke checks (no VM boots here)."""

from pathlib import Path

import pytest

from edgevirt.board import load_board
from edgevirt.deploy.machine import QemuMachine
from edgevirt.devsmoke import SMOKES, device_smoke
from edgevirt.errors import SetupError
from edgevirt.spec import load_spec
from tests.helpers import ROOT, edgevirt

DEVICES_SPEC = ROOT / "devicetree/specs/qemu-virt-devices.toml"
DEVICES_MSG_SPEC = ROOT / "devicetree/specs/qemu-virt-devices-msg.toml"


def spec_file(tmp_path: Path, devices: str, extra: str = "") -> Path:
    p = tmp_path / "spec.toml"
    p.write_text(
        'name = "t"\n[[carveout]]\nname = "shared"\nsize = "64M"\n'
        f"{extra}\n"
        '[[device]]\ntype = "blk"\ntransport = "mmio"\n'
        '[[device]]\ntype = "rng"\ntransport = "mmio"\n' + devices
    )
    return p


def up(tmp_path: Path, spec: Path, *extra: str):
    return edgevirt("up", "--spec", str(spec), "--build-dir", str(tmp_path / "b"), *extra)


def test_unknown_device_option_is_exit_4_naming_it(tmp_path):
    spec = spec_file(tmp_path, '[[device]]\ntype = "net"\ntransport = "mmio"\nspeed = "10G"\n')
    r = up(tmp_path, spec)
    assert r.returncode == 4, r.stderr
    assert "[[device]][2]" in r.stderr and "speed" in r.stderr, r.stderr
    assert not (tmp_path / "b").exists()  # refused before anything was built


def test_device_up_cannot_check_is_exit_4(tmp_path):
    spec = spec_file(tmp_path, '[[device]]\ntype = "sound"\ntransport = "mmio"\n')
    r = up(tmp_path, spec)
    assert r.returncode == 4 and "sound" in r.stderr and "net, vsock, gpio, i2c" in r.stderr


def test_smoke_device_twice_is_exit_4(tmp_path):
    dev = '[[device]]\ntype = "gpio"\ntransport = "mmio"\n'
    r = up(tmp_path, spec_file(tmp_path, dev + dev))
    assert r.returncode == 4 and "one gpio device" in r.stderr, r.stderr


def test_smoke_devices_in_the_service_vm_are_refused_for_now(tmp_path):
    spec = spec_file(tmp_path, '[[device]]\ntype = "vsock"\ntransport = "msg"\n',
                     '[msg]\ndoorbell = "ivshmem-pci"\n')  # fmt: skip
    spec.write_text(spec.read_text().replace('"mmio"', '"msg"'))
    r = up(tmp_path, spec, "--backend", "service-vm")
    assert r.returncode == 4 and "vsock" in r.stderr and "host back-end" in r.stderr, r.stderr


def test_machine_wires_each_device_to_its_smoke(tmp_path):
    spec = load_spec(DEVICES_SPEC)
    m = QemuMachine(load_board("qemu-virt"), tmp_path, spec=spec)
    kinds = [d.kind for d in m.config.devices]
    assert kinds == ["vhost-user-blk", "vhost-user-rng", "virtio-net-device",
                     "vhost-user-vsock-device", "vhost-user-gpio-device",
                     "vhost-user-i2c-device"]  # fmt: skip
    assert sorted(m.smokes) == sorted(SMOKES)
    args = [m._backend_arg(n) for n in m.device_names]
    assert args[0].startswith("blk:path=") and args[1] == "rng"
    assert args[2].startswith("net:tap=evtap0,netns=evup")
    assert args[3] == f"vsock:cid=3,dir={tmp_path / 'vsock-smoke'}"
    assert args[4].startswith("gpio:lines=led+button,ctl=")
    assert "allow=0x48+0x50" in args[5] and "eeprom_file=" in args[5]
    assert m.config.devices[2].options == {"mac": "52:54:00:12:34:56"}
    m.close()  # nothing was created: closing is harmless
    assert device_smoke("blk", tmp_path) is None


def test_msg_machine_starts_no_vhost_user_devices_but_keeps_the_smokes(tmp_path):
    spec = load_spec(DEVICES_MSG_SPEC)
    m = QemuMachine(load_board("qemu-virt"), tmp_path, transport="msg", spec=spec)
    assert m.config.devices == [] and sorted(m.smokes) == sorted(SMOKES)
    m.close()


def test_net_smoke_without_root_is_a_setup_error(tmp_path, monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    smoke = device_smoke("net", tmp_path)
    assert smoke is not None
    with pytest.raises(SetupError, match="need root"):
        smoke.before_backend()
    smoke.close()  # created nothing, removes nothing
