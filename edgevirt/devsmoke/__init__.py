"""In-guest smoke checks of the devices beyond blk and rng, one module per device.

`edgevirt up` runs a device's checks when the system spec has that device. A
:class:`DeviceSmoke` owns the host side of its device for one run (a TAP in a network
namespace, unix sockets, a simulated bank's control socket): it names the back-end's
``--device`` argument and QEMU's vhost-user front-end, prepares and cleans up what the
back-end connects to, and runs its checks on the guest's console. Devices are peers: a new
one adds a module and a line in :data:`SMOKES`.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from edgevirt.console.expect import Console
from edgevirt.smoke import Check

#: Device type → "module:class" of its smoke checks.
SMOKES = {
    "net": "edgevirt.devsmoke.net:NetSmoke",
    "vsock": "edgevirt.devsmoke.vsock:VsockSmoke",
    "gpio": "edgevirt.devsmoke.gpio:GpioSmoke",
    "i2c": "edgevirt.devsmoke.i2c:I2cSmoke",
}


class DeviceSmoke:
    """One device's host side and in-guest checks for one run of `edgevirt up`."""

    type = "?"
    #: QEMU 7.2's vhost-user front-end on virtio-mmio.
    qemu_kind = "?"
    qemu_options: dict[str, str] = {}

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / f"{self.type}-smoke"
        self.dir.mkdir(parents=True, exist_ok=True)

    def backend_arg(self) -> str:
        """The back-end's ``--device`` argument."""
        raise NotImplementedError

    def before_backend(self) -> None:
        """Create what the back-end connects to (before it starts)."""

    def after_backend(self) -> None:
        """Finish the host side once the back-end runs (e.g. address its TAP)."""

    def run(self, console: Console, prefix: str = "") -> list[Check]:
        raise NotImplementedError

    def close(self) -> None:
        """Remove what :meth:`before_backend` created (always called)."""


def supported() -> list[str]:
    return list(SMOKES)


def device_smoke(dtype: str, workdir: Path) -> DeviceSmoke | None:
    """The smoke checks of device type ``dtype``, or None for blk/rng (the suite's own)."""
    ref = SMOKES.get(dtype)
    if ref is None:
        return None
    mod, cls = ref.split(":")
    smoke: DeviceSmoke = getattr(importlib.import_module(mod), cls)(workdir)
    return smoke
