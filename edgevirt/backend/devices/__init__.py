"""Virtio devices: they see descriptor chains, never ring indices."""

from __future__ import annotations

from typing import Any

from edgevirt.backend.devices.base import Chain, VirtioDevice
from edgevirt.backend.devices.blk import BlockDevice
from edgevirt.backend.devices.rng import RngDevice
from edgevirt.errors import ConfigError

BLK_OPTIONS = {"path", "readonly", "queues", "seg_max", "discard", "serial", "cache", "aio"}

__all__ = ["Chain", "VirtioDevice", "BlockDevice", "RngDevice", "parse_device", "make_device",
           "KINDS", "OPTIONS", "LIST_OPTIONS"]  # fmt: skip

#: Options of the communication devices: key → (type, required). Shared by
#: ``--device kind:key=value,…`` and the back-end spec's ``[[device]]`` tables.
OPTIONS: dict[str, dict[str, tuple[type, bool]]] = {
    "net": {
        "tap": (str, True),
        "netns": (str, False),
        "mac": (str, False),
        "offload": (bool, False),
    },
    "vsock": {"cid": (int, True), "dir": (str, True), "buf_alloc": (int, False)},
    "console": {"ports": (str, True), "dir": (str, True)},
    "gpio": {"lines": (str, True), "ctl": (str, False), "chip": (str, False)},
    "i2c": {
        "devices": (str, False),
        "allow": (str, False),
        "bus": (str, False),
        "eeprom_file": (str, False),
    },
}
#: Options that a back-end spec may give as a TOML list (joined with "+" here).
LIST_OPTIONS = {"ports", "lines", "devices", "allow"}
KINDS = ("blk", "rng", *OPTIONS)


def make_device(kind: str, opts: dict[str, Any], where: str) -> VirtioDevice:
    """A net, vsock, console, gpio or i2c device from validated options (``where`` names
    the source)."""
    schema = OPTIONS[kind]
    unknown = set(opts) - set(schema)
    if unknown:
        raise ConfigError(f"{where}: unknown {kind} option(s) {', '.join(sorted(unknown))}; "
                          f"expected {', '.join(schema)}")  # fmt: skip
    for key, (typ, required) in schema.items():
        if required and key not in opts:
            raise ConfigError(f"{where}: {kind} needs {key}=")
        if key in opts and not isinstance(opts[key], typ):
            raise ConfigError(f"{where}: {key}={opts[key]!r} is not {typ.__name__}")
    if kind == "net":
        from edgevirt.backend.devices.net import NetDevice, parse_mac
        from edgevirt.backend.devices.tap import Tap

        mac = parse_mac(opts["mac"]) if "mac" in opts else None
        tap = Tap(opts["tap"], opts.get("netns"))
        offload = opts.get("offload", True)
        return NetDevice(tap, mac, offload) if mac else NetDevice(tap, offload=offload)
    if kind in ("gpio", "i2c"):
        from edgevirt.backend.devices.peripherals import make_peripheral

        return make_peripheral(kind, opts, where)
    if kind == "vsock":
        from edgevirt.backend.devices.vsock import VsockDevice

        return VsockDevice(opts["cid"], opts["dir"], buf_alloc=opts.get("buf_alloc"))
    from edgevirt.backend.devices.console import ConsoleDevice

    return ConsoleDevice.from_ports(opts["ports"], opts["dir"])


def parse_device(spec: str) -> VirtioDevice:
    """``blk:path=FILE[,readonly=on][,queues=N][,seg_max=N][,discard=off][,serial=S]
    [,cache=none|writeback][,aio=auto|io_uring|threads|sync]``,
    ``rng``, ``net:tap=NAME[,netns=NS][,mac=M][,offload=off]``,
    ``vsock:cid=N,dir=D[,buf_alloc=N]``, ``console:ports=NAME[+NAME…],dir=D``,
    ``gpio:lines=NAME[+NAME…][,ctl=SOCK][,chip=DEV]`` or
    ``i2c:devices=KIND@ADDR[+…][,allow=ADDR[+…]][,bus=/dev/i2c-N]`` → a device."""
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
    if kind in OPTIONS:
        typed: dict[str, Any] = dict(opts)
        for key, (typ, _) in OPTIONS[kind].items():
            if typ is int and key in typed:
                typed[key] = _int(spec, opts, key, 0)
            elif typ is bool and key in typed:
                typed[key] = _flag(spec, opts, key, False)
        return make_device(kind, typed, f"device {spec!r}")
    raise ConfigError(f"device {spec!r}: unknown kind {kind!r}, expected {', '.join(KINDS)}")


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
