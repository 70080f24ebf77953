"""Virtio devices: they see descriptor chains, never ring indices."""

from __future__ import annotations

from edgevirt.backend.devices.base import Chain, VirtioDevice
from edgevirt.backend.devices.blk import BlockDevice
from edgevirt.backend.devices.rng import RngDevice
from edgevirt.errors import ConfigError

__all__ = ["Chain", "VirtioDevice", "BlockDevice", "RngDevice", "parse_device"]


def parse_device(spec: str) -> VirtioDevice:
    """``blk:path=disk.img[,readonly=on][,queues=N]`` or ``rng`` → a device."""
    kind, _, rest = spec.partition(":")
    opts: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"device {spec!r}: option {item!r} is not key=value")
        opts[key] = value
    if kind == "blk":
        if "path" not in opts:
            raise ConfigError(f"device {spec!r}: blk needs path=FILE")
        return BlockDevice(
            opts["path"],
            readonly=opts.get("readonly", "off") in ("on", "1", "true"),
            num_queues=int(opts.get("queues", "1")),
        )
    if kind == "rng":
        return RngDevice()
    raise ConfigError(f"device {spec!r}: unknown kind {kind!r}, expected blk or rng")
