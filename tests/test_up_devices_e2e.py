"""End to end: `edgevirt up --spec` with net, vsock, gpio and i2c beside blk and rng, the
host back-end over vhost-user and over virtio-msg; each device's in-guest checks
(edgevirt.devsmoke) appear in result.json, and the network namespace up made is gone afterwards."""

import os
import subprocess

import pytest

from tests.test_e2e_up import run_up
from tests.test_up_devsmoke import DEVICES_MSG_SPEC, DEVICES_SPEC

pytestmark = pytest.mark.e2e

CHECKS = (
    "net ping", "net TCP guest → peer", "net TCP peer → guest",
    "vsock guest → host", "vsock host → guest", "vsock closed port",
    "gpio line names", "gpio output to back-end", "gpio input from back-end",
    "i2c allow-list", "i2c EEPROM write/read", "i2c address not allowed",
    "back-end net", "back-end vsock", "back-end gpio", "back-end i2c",
    "blk write/read-back", "hwrng", "disk image on host",
)  # fmt: skip


def netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a network namespace and a TAP")
@pytest.mark.parametrize("transport", ["vhost-user", "msg"])
def test_up_runs_each_devices_smoke_checks(tmp_path, transport):
    before = netns()
    spec = DEVICES_SPEC if transport == "vhost-user" else DEVICES_MSG_SPEC
    code, result, stderr = run_up(tmp_path / "build", "--spec", str(spec), timeout=600)
    assert code == 0, f"up failed: {result.get('error')}\n{stderr[-2000:]}"
    # over virtio-msg the back-end's rows carry the device number: "back-end net (dev 2)"
    checks = {c["name"].split(" (dev ")[0]: c for c in result["checks"]}
    for name in CHECKS:
        assert checks[name]["ok"], checks.get(name)
    assert {d["device"] for d in result["backend"]["devices"]} == {
        "blk", "rng", "net", "vsock", "gpio", "i2c"}  # fmt: skip
    assert result["transport"] == transport
    if transport == "msg":  # the back-end's VIRTIO_GPIO_F_IRQ reaches the driver here
        for name in ("gpio edge to guest", "virtio-msg bus", "virtio-msg protocol"):
            assert checks[name]["ok"], checks.get(name)
    assert netns() == before
