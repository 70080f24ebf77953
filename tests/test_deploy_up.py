"""`up`'s choices and shared pieces, without booting: transport/back-end resolution, the QEMU
command line per transport, the smoke suite's pool users, one set of host checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from edgevirt.board import load_board
from edgevirt.cli import cli
from edgevirt.deploy.machine import ExternalBus, QemuMachine
from edgevirt.deploy.qemu import QemuConfig, VhostUserDevice
from edgevirt.errors import ConfigError
from edgevirt.smoke import backend_checks, disk_check, msg_bus_check, pool_user, smoke_vars
from edgevirt.up import UpOptions, resolve

SPEC = """name = "s"
{backend}
[[carveout]]
size = "64M"
{msg}
[[device]]
type = "blk"
transport = "{t1}"
[[device]]
type = "rng"
transport = "{t2}"
"""
MSG = '[msg]\ndoorbell = "ivshmem-pci"'


def spec(tmp_path: Path, t1: str = "msg", t2: str = "msg", backend: str = "") -> Path:
    p = tmp_path / "spec.toml"
    msg = MSG if "msg" in (t1, t2) else ""
    p.write_text(SPEC.format(backend=backend, msg=msg, t1=t1, t2=t2))
    return p


def choose(tmp_path: Path, **kw: object) -> tuple[str, str]:
    transport, backend, _ = resolve(UpOptions(tmp_path, **kw), load_board("qemu-virt"))  # type: ignore[arg-type]
    return transport, backend


def test_defaults_and_spec_choices(tmp_path: Path) -> None:
    assert choose(tmp_path) == ("vhost-user", "host")
    assert choose(tmp_path, backend="service-vm") == ("msg", "service-vm")
    assert choose(tmp_path, spec=spec(tmp_path)) == ("msg", "host")
    assert choose(tmp_path, spec=spec(tmp_path, "mmio", "mmio")) == ("vhost-user", "host")
    s = spec(tmp_path, backend='backend = "service-vm"')
    assert choose(tmp_path, spec=s) == ("msg", "service-vm")
    # the default msg spec: blk = dev 0, rng = dev 1, the pool over the QEMU carve-out
    _, _, default = resolve(UpOptions(tmp_path, transport="msg"), load_board("qemu-virt"))
    assert default is not None and [d.type for d in default.devices] == ["blk", "rng"]
    assert default.carveouts[0].placement == 0x5C000000


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"transport": "vhost-user", "backend": "service-vm"}, "reached by messages only"),
        ({"transport": "msg", "restrict": False}, "--no-restrict applies"),
        ({"fault": "late-service"}, "applies to --backend service-vm only"),
        ({"spec": "mixed"}, "`up` runs one transport"),
        ({"spec": "msg", "transport": "vhost-user"}, "contradicts the spec's transport msg"),
    ],
)
def test_contradictions_are_config_errors(tmp_path: Path, kw: dict, message: str) -> None:
    if kw.get("spec") == "mixed":
        kw["spec"] = spec(tmp_path, "mmio", "msg")
    elif kw.get("spec") == "msg":
        kw["spec"] = spec(tmp_path)
    if "fault" in kw:
        from edgevirt.up import _placement

        with pytest.raises(ConfigError, match=message):
            _placement("host", load_board("qemu-virt"), tmp_path, UpOptions(tmp_path, **kw))
        return
    with pytest.raises(ConfigError, match=message):
        choose(tmp_path, **kw)


def test_cli_contradiction_exit_4(tmp_path: Path) -> None:
    r = CliRunner().invoke(
        cli, ["up", "--transport", "vhost-user", "--backend", "service-vm", "--build-dir",
              str(tmp_path)],
    )  # fmt: skip
    assert r.exit_code == 4


def test_vhost_user_chardevs_reconnect_and_msg_gets_ivshmem(tmp_path: Path) -> None:
    board = load_board("qemu-virt")
    m = QemuMachine(board, tmp_path / "vu")
    args = m.config.device_args()
    socks = [a for a in args if a.startswith("socket,id=vu")]
    # blk reconnects to a restarted back-end; QEMU 7.2's vhost-user-rng aborts with it
    assert socks[0].endswith("0-blk.sock,reconnect=1") and "reconnect" not in socks[1]
    assert not any("ivshmem" in a for a in args)
    m = QemuMachine(board, tmp_path / "msg", transport="msg")
    args = m.config.device_args()
    assert "ivshmem-doorbell,chardev=ev-ivshmem,vectors=2" in args
    assert not any("vhost-user" in a for a in args)
    ext = ExternalBus(tmp_path / "co", tmp_path / "fe.sock")
    m = QemuMachine(board, tmp_path / "ext", transport="msg", external=ext)
    assert f"socket,id=ev-ivshmem,path={tmp_path / 'fe.sock'}" in m.config.device_args()
    assert m.shm == tmp_path / "co"
    with pytest.raises(ConfigError, match="needs transport 'msg'"):
        QemuMachine(board, tmp_path / "x", external=ext)
    # a device without options keeps the plain chardev
    cfg = QemuConfig(
        board.qemu, tmp_path / "co", [VhostUserDevice("vhost-user-rng", tmp_path / "s", "c")]
    )
    assert f"socket,id=c,path={tmp_path / 's'}" in cfg.device_args()


def test_pool_users_per_transport() -> None:
    assert pool_user("/virtio_mmio@a003e00") == "a003e00.virtio_mmio"
    assert pool_user("/virtio-msg") == "virtio-msg"
    v = smoke_vars(0x5C000000, 64 << 20, ["/virtio_mmio@a003e00", "/virtio_mmio@a003c00"])
    assert v["pool_users"] == "a003c00.virtio_mmio a003e00.virtio_mmio"
    assert v["virtio_nodes"] == "a003c00 a003e00"
    assert smoke_vars(0x5C000000, 64 << 20, ["/virtio-msg"])["pool_users"] == "virtio-msg"


def test_one_set_of_host_checks(tmp_path: Path) -> None:
    size = 64 << 20
    good = {"device": "blk", "mapped_bytes": size, "refused": 0, "requests": 3, "broken": []}
    vu = backend_checks({"devices": [good]}, size)
    assert [(c.name, c.ok) for c in vu] == [("back-end blk", True)]
    msg = backend_checks(
        {"devices": [{**good, "dev_num": 0, "refused": 1}], "messages_in": 5,
         "protocol_errors": 0},
        size,
        prefix="service VM: ",
    )  # fmt: skip
    assert [(c.name, c.ok) for c in msg] == [
        ("service VM: back-end blk (dev 0)", False),
        ("service VM: virtio-msg protocol", True),
    ]
    assert not backend_checks({}, size)[0].ok
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    import hashlib

    digest = hashlib.sha256(b"\0" * 4096).hexdigest()
    assert disk_check(disk, f"{digest}  -\n").ok
    assert not disk_check(disk, "0" * 64 + "  -\n", "host: x").ok
    out = (
        "virtio-msg bus: 64 slots per direction, device peer 0, MSI-X\n"
        "virtio-msg: device 0: virtio id 2, 1 queues, virtio0\n"
        "virtio-msg: device 1: virtio id 4, 1 queues, virtio1\n"
    )
    assert msg_bus_check(out, 2).ok
    assert not msg_bus_check(out.replace("MSI-X", "polling"), 2).ok
    assert "expected 3 devices" in msg_bus_check(out, 3, "front-end: ").detail
