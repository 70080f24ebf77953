"""`edgevirt deploy`, `edgevirt test` and `edgevirt console` from the command line."""

import json
from functools import partial

import pytest

from tests.helpers import edgevirt as run_edgevirt

# These commands boot targets: a tighter safety net than the helper's default.
edgevirt = partial(run_edgevirt, timeout=300)


@pytest.mark.e2e
def test_deploy_uboot_board_to_its_bootloader(tmp_path):
    r = edgevirt(
        "deploy",
        "--board",
        "qemu-virt-uboot",
        "--state",
        "bootloader",
        "--json",
        "--build-dir",
        str(tmp_path),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert (res["state"], res["strategy"], res["load"]) == ("bootloader", "u-boot", "tftp")
    assert "EVR1 0" in (tmp_path / "console.log").read_text()  # framed U-Boot command ran


@pytest.mark.e2e
def test_deploy_to_a_state_the_strategy_lacks_is_an_error(tmp_path):
    r = edgevirt(
        "deploy", "--board", "qemu-virt", "--state", "bootloader", "--build-dir", str(tmp_path)
    )
    assert r.returncode == 1
    flat = " ".join(r.stderr.split())
    assert "direct boot strategy cannot reach state 'bootloader'" in flat
    assert "off → kernel → shell" in flat


@pytest.mark.e2e
def test_deploy_with_transport_msg_boots_the_guest_on_the_virtio_msg_bus(tmp_path):
    r = edgevirt("deploy", "--transport", "msg", "--json", "--build-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert (res["state"], res["transport"]) == ("shell", "msg")
    assert "-device ivshmem-doorbell," in (tmp_path / "qemu.cmdline").read_text()
    log = (tmp_path / "console.log").read_text()
    assert "virtio-msg bus: 64 slots per direction" in log
    assert "virtio-msg: device 0: virtio id 2" in log and "virtio-msg: device 1: virtio id 4" in log
    assert not (tmp_path / "sockets" / "0-blk.sock").exists()  # no vhost-user back-end


@pytest.mark.e2e
def test_test_with_transport_msg_passes_the_smoke_suite_over_virtio_msg(tmp_path):
    r = edgevirt("test", "smoke", "--transport", "msg", "--json", "--build-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    steps = {s["name"]: s for s in res["targets"][0]["suites"][0]["steps"]}
    assert res["ok"] and all(s["ok"] for s in steps.values())
    assert steps["restricted DMA pool"]["detail"].endswith("assigned to virtio-msg")
    assert "-device ivshmem-doorbell," in (tmp_path / "qemu.cmdline").read_text()


def test_transport_on_a_real_board_is_a_config_error(tmp_path):
    r = edgevirt("deploy", "--board", "rpi4b", "--transport", "msg", "--build-dir", str(tmp_path))
    assert r.returncode == 4
    assert "transport 'msg' applies to QEMU boards" in " ".join(r.stderr.split())


def test_console_of_a_board_without_url_says_what_to_do():
    r = edgevirt("console", "--board", "qemu-virt")
    assert r.returncode == 4
    assert "no url" in r.stderr and "edgevirt deploy -i" in " ".join(r.stderr.split())


def test_console_unreachable_url_fails_clearly(tmp_path):
    r = edgevirt(
        "console",
        "--board",
        "qemu-virt",
        "--url",
        f"unix://{tmp_path}/none.sock",
        "--log",
        str(tmp_path / "c.log"),
    )
    assert r.returncode == 1 and "cannot open unix://" in " ".join(r.stderr.split())
