"""The back-end spec (TOML): which devices to serve and over which transport.

What ``edgevirt backend run --spec FILE`` reads. Validated with messages that name the
file, the key and what was expected; relative paths are relative to the spec's directory.
Example::

    transport = "msg"            # "vhost-user" (default) or "msg" (virtio-msg bus)
    stats = "backend-stats.json" # optional: keep a JSON stats file up to date here

    [vhost_user]                 # transport "vhost-user"
    socket_dir = "/tmp/ev"       # one socket per device: <index>-<kind>.sock

    [msg]                        # transport "msg": we are the ivshmem server
    socket = "/tmp/ev/ivshmem.sock"       # QEMU: -chardev socket,path=… + ivshmem-doorbell
    carveout_file = "/dev/shm/carveout"   # the guest's carve-out (memory-backend-file)
    carveout_base = 0x5c000000            # its guest-physical address
    carveout_size = "64M"                 # default: the whole file
    poll_interval = 0.002                 # polling fallback (s); default: doorbells + 50 ms

    [[device]]
    type = "blk"                 # blk: path, readonly, queues, seg_max, discard, serial,
    cache = "none"               #      cache (none: O_DIRECT, writeback), aio (auto, io_uring,
                                 #      threads, sync)
    path = "disk.img"
    queues = 2
    [[device]]
    type = "rng"                 # rng: no options
    [[device]]
    type = "net"                 # net: tap (required), netns, mac
    tap = "evtap0"
    netns = "edgevirt-lab"
    [[device]]
    type = "vsock"               # vsock: cid, dir (both required), buf_alloc
    cid = 3
    dir = "vsock"                # <dir>/vsock_<port>, <dir>/vsock
    [[device]]
    type = "console"             # console: ports (required), dir (required), console
    ports = ["log", "ctl"]       # <dir>/<name>.sock and <dir>/<name>.log
    console = "log"              # this port becomes the guest's /dev/hvc0
    pty = ["log"]                # these ports are pseudo-terminals (<dir>/<name>.pty)
    dir = "console"
    [[device]]
    type = "gpio"                # gpio: lines (required), ctl (simulated) or chip (real)
    lines = ["led", "button"]    # the guest's lines 0.. (real chip: "led@0" = offset 0)
    ctl = "gpio.sock"            # `edgevirt backend gpio set --ctl gpio.sock button 1`
    [[device]]
    type = "i2c"                 # i2c: devices (simulated) or bus (real), allow, eeprom_file
    devices = ["eeprom@0x50", "regmap@0x48"]
    allow = [0x50, 0x48]         # the addresses this front-end may reach (bus=: required)

Device numbers on the virtio-msg bus (and vhost-user socket indices) are the order of the
``[[device]]`` tables. :class:`MsgBackendService` is the virtio-msg service with the same
``serve() -> final statistics`` contract as the vhost-user one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevirt.backend.devices import (
    LIST_OPTIONS,
    OPTIONS,
    BlockDevice,
    RngDevice,
    VirtioDevice,
    make_device,
)
from edgevirt.backend.devices.blk import AIO_MODES, CACHE_MODES
from edgevirt.backend.memory import GuestMemory
from edgevirt.backend.transport.virtio_msg.service import MsgService
from edgevirt.board import check_keys, get_key, parse_address, parse_size, read_toml
from edgevirt.errors import ConfigError

__all__ = [
    "TRANSPORTS",
    "BackendSpec",
    "DeviceSpec",
    "MsgBackendService",
    "MsgTransportSpec",
    "load_backend_spec",
]

TRANSPORTS = ("vhost-user", "msg")
BLK_KEYS = {"type", "path", "readonly", "queues", "seg_max", "discard", "serial", "cache", "aio"}


@dataclass(frozen=True)
class DeviceSpec:
    kind: str  # blk | rng | net | vsock | console
    path: Path | None = None
    readonly: bool = False
    queues: int = 1
    seg_max: int = 126
    discard: bool = True
    serial: str = "edgevirt"
    cache: str = "writeback"
    aio: str = "auto"
    #: net, vsock, console: their validated options (devices.OPTIONS), in table order.
    options: tuple[tuple[str, Any], ...] = ()
    where: str = ""

    def open(self) -> VirtioDevice:
        if self.kind == "rng":
            return RngDevice()
        if self.kind in OPTIONS:
            return make_device(self.kind, dict(self.options), self.where)
        assert self.path is not None
        return BlockDevice(
            str(self.path),
            readonly=self.readonly,
            num_queues=self.queues,
            seg_max=self.seg_max,
            discard=self.discard,
            serial=self.serial,
            cache=self.cache,
            aio=self.aio,
        )


@dataclass(frozen=True)
class MsgTransportSpec:
    socket: Path | None = None
    carveout_file: Path | None = None
    carveout_base: int | None = None
    carveout_size: int | None = None
    poll_interval: float | None = None


@dataclass(frozen=True)
class BackendSpec:
    path: Path
    transport: str
    devices: tuple[DeviceSpec, ...]
    socket_dir: Path | None
    msg: MsgTransportSpec
    stats: Path | None


def load_backend_spec(path: str | Path) -> BackendSpec:
    p = Path(path)
    f = str(p)
    data = read_toml(p, "back-end spec")
    here = p.resolve().parent
    check_keys(data, {"transport", "stats", "vhost_user", "msg", "device"}, f)
    transport = get_key(data, "transport", str, f, "vhost-user")
    if transport not in TRANSPORTS:
        raise ConfigError(
            f"{f}.transport: expected one of {', '.join(TRANSPORTS)}, got {transport!r}"
        )
    stats = get_key(data, "stats", str, f, None)

    vu = _table(data, "vhost_user", f)
    check_keys(vu, {"socket_dir"}, f"{f}: [vhost_user]")
    socket_dir = get_key(vu, "socket_dir", str, f"{f}: [vhost_user]", None)

    m = _table(data, "msg", f)
    w = f"{f}: [msg]"
    check_keys(m, {"socket", "carveout_file", "carveout_base", "carveout_size", "poll_interval"}, w)
    msg = MsgTransportSpec(
        socket=_path(here, get_key(m, "socket", str, w, None)),
        carveout_file=_path(here, get_key(m, "carveout_file", str, w, None)),
        carveout_base=(
            parse_address(m["carveout_base"], f"{w}.carveout_base")
            if "carveout_base" in m
            else None
        ),
        carveout_size=(
            parse_size(m["carveout_size"], f"{w}.carveout_size") if "carveout_size" in m else None
        ),
        poll_interval=_interval(m, w),
    )
    # socket, carveout_file and carveout_base may come from the command line instead
    # (a launcher that names its /dev/shm file per run): the CLI checks what is missing.
    if transport != "msg" and m:
        raise ConfigError(f"{w}: applies to transport 'msg' only; this spec's is {transport!r}")
    if transport == "msg" and vu:
        raise ConfigError(f"{f}: [vhost_user]: applies to transport 'vhost-user' only")

    devices = data.get("device", [])
    if not isinstance(devices, list) or not all(isinstance(t, dict) for t in devices):
        raise ConfigError(f"{f}: [[device]]: expected tables")
    if not devices:
        raise ConfigError(f"{f}: expected at least one [[device]] (type = 'blk', 'rng', …)")
    specs = tuple(_device(t, f"{f}: [[device]][{i}]", here) for i, t in enumerate(devices))
    return BackendSpec(
        path=p,
        transport=transport,
        devices=specs,
        socket_dir=_path(here, socket_dir),
        msg=msg,
        stats=_path(here, stats),
    )


def _table(data: dict[str, Any], key: str, f: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{f}.{key}: expected a table [{key}], got {type(value).__name__}")
    return value


def _path(here: Path, value: str | None) -> Path | None:
    return None if value is None else here / Path(value).expanduser()


def _interval(m: dict[str, Any], where: str) -> float | None:
    value = get_key(m, "poll_interval", (int, float), where, None)
    if value is None:
        return None
    if isinstance(value, bool) or not math.isfinite(value) or not 0.0001 <= value <= 10:
        raise ConfigError(f"{where}.poll_interval: expected seconds in 0.0001..10, got {value!r}")
    return float(value)


def _device(t: dict[str, Any], w: str, here: Path) -> DeviceSpec:
    kind = get_key(t, "type", str, w)
    if kind == "rng":
        check_keys(t, {"type"}, f"{w} (rng)")
        return DeviceSpec("rng")
    if kind in OPTIONS:
        return _comm_device(kind, t, w, here)
    if kind != "blk":
        raise ConfigError(f"{w}.type: expected one of blk, rng, {', '.join(OPTIONS)}; got {kind!r}")
    check_keys(t, BLK_KEYS, f"{w} (blk)")
    path = _path(here, get_key(t, "path", str, w))
    assert path is not None
    if not path.exists():
        raise ConfigError(f"{w}.path: {path} does not exist")
    queues = get_key(t, "queues", int, w, 1)
    if not 1 <= queues <= 64:
        raise ConfigError(f"{w}.queues: expected 1..64, got {queues}")
    seg_max = get_key(t, "seg_max", int, w, 126)
    if not 1 <= seg_max <= 1024:
        raise ConfigError(f"{w}.seg_max: expected 1..1024, got {seg_max}")
    return DeviceSpec(
        "blk",
        path=path,
        readonly=get_key(t, "readonly", bool, w, False),
        queues=queues,
        seg_max=seg_max,
        discard=get_key(t, "discard", bool, w, True),
        serial=get_key(t, "serial", str, w, "edgevirt"),
        cache=_choice(t, "cache", w, CACHE_MODES, "writeback"),
        aio=_choice(t, "aio", w, AIO_MODES, "auto"),
    )


def _choice(t: dict[str, Any], key: str, w: str, choices: tuple[str, ...], default: str) -> str:
    value = get_key(t, key, str, w, default)
    if value not in choices:
        raise ConfigError(f"{w}.{key}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def _comm_device(kind: str, t: dict[str, Any], w: str, here: Path) -> DeviceSpec:
    schema = OPTIONS[kind]
    extra = ("console", "pty") if kind == "console" else ()
    check_keys(t, {"type", *schema, *extra}, f"{w} ({kind})")
    opts: dict[str, Any] = {}
    for key, (typ, required) in schema.items():
        if key == "ports":  # a list of names in TOML; "a+b" on the command line
            names = get_key(t, key, list, w)
            if not names or not all(isinstance(n, str) for n in names):
                raise ConfigError(f"{w}.ports: expected a non-empty list of port names")
            console = get_key(t, "console", str, w, None)
            ptys = get_key(t, "pty", list, w, [])
            opts[key] = "+".join(
                n + ("@pty" if n in ptys else "") + ("!" if n == console else "") for n in names
            )
            if console is not None and console not in names:
                raise ConfigError(f"{w}.console: {console!r} is not one of ports {names}")
            if not set(ptys) <= set(names):
                raise ConfigError(f"{w}.pty: {ptys} are not all among ports {names}")
            continue
        if key in LIST_OPTIONS and isinstance(t.get(key), list):
            opts[key] = _joined(t[key], f"{w}.{key}")
            continue
        value = get_key(t, key, typ, w, ...) if required else get_key(t, key, typ, w, None)
        if value is None:
            continue
        if key in ("dir", "ctl", "eeprom_file"):
            value = str(_path(here, value))
        opts[key] = value
    return DeviceSpec(kind, options=tuple(opts.items()), where=w)


def _joined(items: list[Any], where: str) -> str:
    """A TOML list of names (or of addresses, ints allowed) → the "a+b" option form."""
    if not items or not all(isinstance(i, str | int) and not isinstance(i, bool) for i in items):
        raise ConfigError(f"{where}: expected a non-empty list of names or numbers")
    return "+".join(hex(i) if isinstance(i, int) else i for i in items)


class MsgBackendService(MsgService):
    """:class:`MsgService` whose :meth:`serve` returns the final statistics (taken just
    before the bus and the carve-out mapping are closed), like ``BackendService.run``."""

    final: dict | None = None

    def close(self) -> None:
        self.final = self.snapshot()
        self.final["running"] = False
        super().close()

    def serve(self) -> dict:
        self.run()
        return self.final or {}


def open_msg_service(
    devices: Sequence[VirtioDevice],
    mem: GuestMemory,
    socket: Path,
    stats: Path | None,
    poll_interval: float | None,
) -> MsgBackendService:
    """The bus on ``socket`` (we are the ivshmem server). On failure the carve-out mapping
    and the devices are closed before the error propagates."""
    try:
        return MsgBackendService(devices, mem, str(socket), stats, poll_interval)
    except BaseException:
        mem.close()
        for d in devices:
            d.close()
        raise
