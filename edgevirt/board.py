"""Board profiles (``boards/<name>.toml``), validated with messages naming file and key.

This module parses what every layer needs (name, ``[qemu]`` topology, ``[console]``); a
layer that owns another section (deploy, devicetree, …) validates it from ``Board.raw``
with :func:`get_key` and :func:`parse_size`, so its schema lives beside its code.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevirt.errors import ConfigError
from edgevirt.paths import boards_dir

_SIZE = re.compile(r"(\d+)\s*([KMG]?)i?B?", re.I)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(value: Any, where: str) -> int:
    """``64M``, ``"1G"``, ``0x4000000`` or an int → bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (m := _SIZE.fullmatch(value.strip())):
        size = int(m.group(1)) * _UNITS[m.group(2).upper()]
    elif isinstance(value, str) and re.fullmatch(r"0x[0-9a-fA-F]+", value.strip()):
        size = int(value, 16)
    else:
        raise ConfigError(f"{where}: expected a size like 64M or 0x4000000, got {value!r}")
    if size <= 0:
        raise ConfigError(f"{where}: size must be > 0, got {value!r}")
    return size


@dataclass(frozen=True)
class QemuSettings:
    binary: str
    machine: str
    cpu: str
    smp: int
    ram: int
    carveout: int
    ram_base: int

    @property
    def carveout_base(self) -> int:
        return self.ram_base + self.ram


@dataclass(frozen=True)
class Board:
    name: str
    description: str
    path: Path
    qemu: QemuSettings
    console_kernel: str
    console_uart: str
    #: The whole parsed TOML document, for layers that own other sections.
    raw: dict[str, Any]

    def where(self, section: str) -> str:
        """``<file>: [section]`` prefix for error messages about that section."""
        return f"{self.path}: [{section}]"


def get_key(table: dict[str, Any], key: str, kind: Any, where: str, default: Any = ...) -> Any:
    if key not in table:
        if default is ...:
            raise ConfigError(f"{where}: missing key {key!r}")
        return default
    value = table[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = "/".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
        raise ConfigError(f"{where}.{key}: expected {names}, got {type(value).__name__} {value!r}")
    return value


def load_board(name_or_path: str) -> Board:
    path = Path(name_or_path)
    if not path.suffix:
        path = boards_dir() / f"{name_or_path}.toml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in boards_dir().glob("*.toml")))
        raise ConfigError(f"board {name_or_path!r} not found ({path}); known boards: {known}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from e
    f = str(path)
    q = get_key(data, "qemu", dict, f)
    c = get_key(data, "console", dict, f)
    qw = f"{f}: [qemu]"
    settings = QemuSettings(
        binary=get_key(q, "binary", str, qw, "qemu-system-aarch64"),
        machine=get_key(q, "machine", str, qw),
        cpu=get_key(q, "cpu", str, qw, "cortex-a57"),
        smp=get_key(q, "smp", int, qw, 1),
        ram=parse_size(get_key(q, "ram", (str, int), qw), f"{qw}.ram"),
        carveout=parse_size(get_key(q, "carveout", (str, int), qw), f"{qw}.carveout"),
        ram_base=get_key(q, "ram_base", int, qw, 0x40000000),
    )
    page = 0x200000  # QEMU NUMA nodes and restricted pools want 2 MiB granularity
    for key in ("ram", "carveout"):
        if getattr(settings, key) % page:
            raise ConfigError(
                f"{qw}.{key}: {getattr(settings, key):#x} is not a multiple of {page:#x}"
            )
    return Board(
        name=get_key(data, "name", str, f),
        description=get_key(data, "description", str, f, ""),
        path=path,
        qemu=settings,
        console_kernel=get_key(c, "kernel", str, f"{f}: [console]"),
        console_uart=get_key(c, "uart", str, f"{f}: [console]", ""),
        raw=data,
    )
