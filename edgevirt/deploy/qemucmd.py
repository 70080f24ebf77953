"""The one place that starts a QEMU command line.

Every QEMU that edgevirt or its tests run begins here, so what a machine needs is said
explicitly instead of being left to QEMU's defaults. The default that bites: without
``-nic`` QEMU adds a NIC whose option ROM (``efi-virtio.rom``) comes from ``ipxe-qemu``,
which a ``--no-install-recommends`` install leaves out, and QEMU then refuses to start
(DESIGN §3). A caller that wants a network adds its own ``-netdev``/``-device``.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_BINARY = "qemu-system-aarch64"


def qemu_base(
    machine: str,
    *,
    binary: str = DEFAULT_BINARY,
    cpu: str | None = None,
    smp: int | None = None,
    memory: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """``binary -machine M [-cpu] [-smp] [-m] -nographic -nic none [extra…]``.

    ``memory`` is QEMU's ``-m`` value (``"512M"``); leave it out when the caller gives
    memory backends of its own. ``-nographic`` keeps QEMU off any display and puts the
    monitor off the serial line unless the caller routes it.
    """
    cmd = [binary, "-machine", machine]
    if cpu:
        cmd += ["-cpu", cpu]
    if smp:
        cmd += ["-smp", str(smp)]
    if memory:
        cmd += ["-m", memory]
    cmd += ["-nographic", "-nic", "none", *extra]
    return cmd
