"""End to end: `edgevirt up --spec` with net, vsock, console, gpio and i2c beside blk and
rng: the host back-end over vhost-user (no console there: QEMU 7.2 has no vhost-user console
front-end) and over virtio-msg, and the back-end in the service VM (virtio-msg, the far
side of every device inside the service VM). Each device's in-guest checks
(edgevirt.devsmoke) appear in result.json, and the network namespace up made is gone
afterwards."""

import os
import subprocess

import pytest

from tests.test_e2e_up import run_up
from tests.test_up_devsmoke import DEVICES_MSG_SPEC, DEVICES_SPEC, DEVICES_SVM_SPEC

pytestmark = pytest.mark.e2e

CHECKS = (
    "net ping", "net TCP guest → peer", "net TCP peer → guest",
    "vsock guest → host", "vsock host → guest", "vsock closed port",
    "vsock host-opened, guest → host", "vsock host-opened, host → guest",
    "gpio line names", "gpio output to back-end", "gpio input from back-end",
    "i2c allow-list", "i2c EEPROM write/read", "i2c address not allowed",
    "back-end net", "back-end vsock", "back-end gpio", "back-end i2c",
    "blk write/read-back", "hwrng", "disk image on host",
)  # fmt: skip
CONSOLE_CHECKS = ("console ports", "console input to guest", "console output to host",
                  "console port log", "back-end console")  # fmt: skip


def netns() -> set[str]:
    """The namespaces ``up`` makes (``evup<pid>…``); other tests' come and go meanwhile."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {w for line in out.splitlines() if line.strip() for w in line.split()[:1]
            if w.startswith("evup")}  # fmt: skip


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
    devices = {"blk", "rng", "net", "vsock", "gpio", "i2c"}
    assert result["transport"] == transport
    if transport == "msg":  # the back-end's VIRTIO_GPIO_F_IRQ reaches the driver here
        for name in ("gpio edge to guest", "virtio-msg bus", "virtio-msg protocol",
                     *CONSOLE_CHECKS):  # fmt: skip
            assert checks[name]["ok"], checks.get(name)
        devices.add("console")
    assert {d["device"] for d in result["backend"]["devices"]} == devices
    assert netns() == before


SVM_CHECKS = (
    "net ping", "net TCP guest → peer", "net TCP peer → guest",
    "vsock guest → host", "vsock host → guest", "vsock closed port",
    "vsock host-opened, guest → host", "vsock host-opened, host → guest",
    "console ports", "console input to guest", "console output to service VM",
    "console port log",
    "gpio line names", "gpio output to back-end", "gpio input from back-end",
    "gpio edge to guest",
    "i2c allow-list", "i2c EEPROM write/read", "i2c address not allowed",
    "blk write/read-back", "hwrng", "virtio-msg bus",
)  # fmt: skip


def test_up_service_vm_serves_every_device(tmp_path):
    """The back-end in the service VM lends its own disk, entropy, network stack (a TAP in
    the service VM), unix sockets (vsock, console), a gpio-sim chip and an i2c-stub
    adapter; every device's in-guest checks pass over virtio-msg, the service VM's
    back-end mapped exactly the carve-out for each, and nothing is left on the host."""
    before = netns()
    code, result, stderr = run_up(tmp_path / "build", "--spec", str(DEVICES_SVM_SPEC),
                                  timeout=600)  # fmt: skip
    assert code == 0, f"up failed: {result.get('error')}\n{stderr[-2000:]}"
    checks = {c["name"].split(" (dev ")[0]: c for c in result["checks"]}
    assert (result["transport"], result["backend_in"]) == ("msg", "service-vm")
    for name in SVM_CHECKS:
        assert checks[f"front-end: {name}"]["ok"], checks.get(f"front-end: {name}")
    for dev in ("blk", "rng", "net", "vsock", "console", "gpio", "i2c"):
        name = f"service VM: back-end {dev}"
        assert checks[name]["ok"], checks.get(name)
    for name in ("service VM: virtio-msg protocol", "service VM: MSI-X interrupts"):
        assert checks[name]["ok"], checks.get(name)
    # the sizes moved in the service VM (TCG) are said in the output
    assert "service VM under TCG" in checks["front-end: net TCP guest → peer"]["detail"]
    assert "service VM under TCG" in checks["front-end: vsock host-opened, host → guest"][
        "detail"]  # fmt: skip
    assert "gpio-sim" in checks["front-end: gpio line names"]["detail"]
    assert "i2c-stub" in checks["front-end: i2c EEPROM write/read"]["detail"]
    assert netns() == before
    out = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout
    assert out.strip() == "", f"processes left behind: {out}"
