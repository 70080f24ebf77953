"""Virtio devices: they see descriptor chains, never ring indices."""

from __future__ import annotations

from edgevirt.backend.devices.base import Chain, VirtioDevice
from edgevirt.backend.devices.blk import BlockDevice
from edgevirt.backend.devices.rng import RngDevice
from edgevirt.errors import ConfigError

BLK_OPTIONS = {"path", "readonly", "queues", "seg_max", "discard", "serial", "cache", "aio"}

__all__ = ["Chain", "VirtioDevice", "BlockDevice", "RngDevice", "parse_device"]


def parse_device(spec: str) -> VirtioDevice:
    """``blk:path=FILE[,readonly=on][,queues=N][,seg_max=N][,discard=off][,serial=S]
    [,cache=none|writeback][,aio=auto|io_uring|threads|sync]`` or ``rng`` → a device."""
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
        unknown = set(opts) - BLK_OPTIONS
        if unknown:
            raise ConfigError(
                f"device {spec!r}: unknown blk option(s) {', '.join(sorted(unknown))}"
            )
        return BlockDevice(
            opts["path"],
            readonly=_flag(spec, opts, "readonly", False),
            num_queues=_int(spec, opts, "queues", 1),
            seg_max=_int(spec, opts, "seg_max", 126),
            discard=_flag(spec, opts, "discard", True),
            serial=opts.get("serial", "edgevirt"),
            cache=opts.get("cache", "writeback"),
            aio=opts.get("aio", "auto"),
        )
    if kind == "rng":
        if opts:
            raise ConfigError(f"device {spec!r}: rng takes no options")
        return RngDevice()
    raise ConfigError(f"device {spec!r}: unknown kind {kind!r}, expected blk or rng")


def _flag(spec: str, opts: dict[str, str], key: str, default: bool) -> bool:
    value = opts.get(key)
    if value is None:
        return default
    if value in ("on", "1", "true", "yes"):
        return True
    if value in ("off", "0", "false", "no"):
        return False
    raise ConfigError(f"device {spec!r}: {key}={value!r}, expected on or off")


def _int(spec: str, opts: dict[str, str], key: str, default: int) -> int:
    value = opts.get(key)
    if value is None:
        return default
    try:
        return int(value, 0)
    except ValueError:
        raise ConfigError(f"device {spec!r}: {key}={value!r} is not an integer") from None
