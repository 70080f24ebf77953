"""Board profiles (``boards/<name>.toml``), validated with messages naming file and key.

Every board has a name, a base device tree (``[dt]``), its RAM (``[[ram]]``, or taken from
the DTB's memory nodes), a console and, for boards booted by U-Boot, a ``[bootloader]``.
QEMU boards add ``[qemu]`` (the machine and the carve-out topology of DESIGN §3). Layers
that own another section (``[power]``, ``[tftp]`` for deploy) parse it from ``Board.raw``
with :func:`get_key` and :func:`parse_size`, so their schema lives beside their code.

Schema (keys not listed are refused, so a typo is an error, not a silent default)::

    name, description, soc
    [qemu]       binary machine cpu smp ram carveout ram_base  (deploy may add more)
    [dt]         source = "qemu-dumpdtb" | "kernel:<dir>/<board>.dtb" | "file:<path>"
                 interrupt_controller = "/path"   (default: the root's interrupt-parent)
                 spi_range = [first, last]        (GIC SPIs free for nodes edgevirt adds)
    [[ram]]      base size                        (default: the DTB's memory nodes)
    [console]    uart kernel url baudrate
    [bootloader] kind="u-boot" prompt kernel_addr_r ramdisk_addr_r fdt_addr_r fit_addr_r
                 kernel_comp_addr_r (compressed loads, decompressed from there)
                 loady_baudrate (ymodem loads switch the line to this rate and back)
                 kernel_size ramdisk_size fdt_size fit_size kernel_comp_size  (extent kept free)
    [boot]       chain = "direct" | "u-boot" | "fastboot" | "uefi"   (see BOOT_CHAINS)
                 stages = ["BootROM", "TF-A BL2", …]   (the board's real chain, for people)

``[boot] chain`` says how the board really boots; without it, a ``[bootloader]`` means
``u-boot``, a QEMU board without one ``direct``, and a real board none at all (a profile
for device-tree work, which deploy refuses). A chain must match the sections it
needs (``u-boot`` a ``[bootloader]``, ``fastboot`` a ``[fastboot]``), so a profile cannot
claim one chain and describe another.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgevirt.errors import ConfigError
from edgevirt.paths import boards_dir

_SIZE = re.compile(r"(\d+)\s*([KMG]?)i?B?", re.I)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}

#: Sections this module parses; others are the business of the layer that owns them.
_OWN_SECTIONS = {"qemu", "dt", "ram", "console", "bootloader", "boot"}
_TOP_KEYS = {"name", "description", "soc"}
#: Sections other layers parse from ``Board.raw`` (deploy: power control, TFTP server,
#: the fastboot device and its boot image; image: the SD card).
_FOREIGN_SECTIONS = {"power", "tftp", "fastboot", "sdcard"}
_DT_SOURCES = ("qemu-dumpdtb", "kernel:", "file:")
#: Default extent kept free at each bootloader load address (overlap checks).
_LOAD_SIZES = {
    "kernel": 64 << 20,
    "ramdisk": 64 << 20,
    "fdt": 1 << 20,
    "fit": 128 << 20,
    "kernel_comp": 32 << 20,  # compressed payloads land here before lzmadec (ymodem)
}


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


def parse_address(value: Any, where: str) -> int:
    """An address: an int (TOML ``0x…`` literals are ints) or a ``"0x…"`` string."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and re.fullmatch(r"0x[0-9a-fA-F]+", value.strip()):
        return int(value, 16)
    raise ConfigError(f"{where}: expected an address like 0x48000000, got {value!r}")


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
class DtSettings:
    """Where the board's base DTB comes from, and what new nodes may use."""

    source: str  # "qemu-dumpdtb", "kernel:renesas/x.dtb" or "file:/abs/or/board-relative"
    interrupt_controller: str | None  # None: the root's interrupt-parent
    spi_range: tuple[int, int] | None  # inclusive GIC SPI numbers free for new nodes

    @property
    def kind(self) -> str:
        return self.source.partition(":")[0]

    @property
    def argument(self) -> str:
        return self.source.partition(":")[2]


@dataclass(frozen=True)
class RamRange:
    base: int
    size: int

    @property
    def end(self) -> int:
        return self.base + self.size


@dataclass(frozen=True)
class LoadAddress:
    """A bootloader load address and the extent kept free there."""

    name: str  # kernel_addr_r, ramdisk_addr_r, fdt_addr_r, fit_addr_r
    address: int
    size: int


@dataclass(frozen=True)
class Bootloader:
    kind: str
    prompt: str
    kernel_addr_r: int
    ramdisk_addr_r: int | None = None
    fdt_addr_r: int | None = None
    fit_addr_r: int | None = None
    loads: tuple[LoadAddress, ...] = ()


#: Every boot chain a profile may name, and whether edgevirt's deploy drives it (and how).
BOOT_CHAINS: dict[str, str | None] = {
    "direct": "QEMU loads kernel, initramfs and DTB itself",
    "u-boot": "U-Boot on the console: stop autoboot, load (TFTP, ymodem, SD card), boot",
    "fastboot": "an Android bootloader (e.g. Qualcomm ABL): `fastboot boot` a boot image",
    # Known, not driven: deploy refuses these with what to do instead (deploy/chain.py).
    "uefi": None,
}


@dataclass(frozen=True)
class BootChain:
    chain: str
    #: The board's real stages, first to last, as documentation (e.g. BootROM, TF-A, U-Boot).
    stages: tuple[str, ...] = ()

    @property
    def driven(self) -> bool:
        return BOOT_CHAINS.get(self.chain) is not None


@dataclass(frozen=True)
class ConsoleSettings:
    kernel: str  # the kernel's console device, e.g. ttyAMA0
    uart: str  # the UART's DT path
    url: str | None  # pyserial URL for real boards (/dev/ttyUSB0, socket://, rfc2217://…)
    baudrate: int


@dataclass(frozen=True)
class Board:
    name: str
    description: str
    path: Path
    qemu_settings: QemuSettings | None
    console_kernel: str
    console_uart: str
    #: The whole parsed TOML document, for layers that own other sections.
    raw: dict[str, Any]
    soc: str = ""
    dt: DtSettings = field(default_factory=lambda: DtSettings("qemu-dumpdtb", None, None))
    ram: tuple[RamRange, ...] = ()
    console: ConsoleSettings | None = None
    bootloader: Bootloader | None = None
    boot: BootChain = field(default_factory=lambda: BootChain("direct"))

    @property
    def is_qemu(self) -> bool:
        return self.qemu_settings is not None

    @property
    def qemu(self) -> QemuSettings:
        """The ``[qemu]`` settings; a :class:`ConfigError` for a real board."""
        if self.qemu_settings is None:
            raise ConfigError(
                f"{self.path}: board {self.name!r} has no [qemu] section (a real board)",
                hint="QEMU commands need a QEMU board such as qemu-virt",
            )
        return self.qemu_settings

    def where(self, section: str) -> str:
        """``<file>: [section]`` prefix for error messages about that section."""
        return f"{self.path}: [{section}]"


def read_toml(path: Path, what: str = "") -> dict[str, Any]:
    """A TOML file as a table; every way it can be unreadable is a ConfigError naming it
    (not UTF-8, deeper nesting than the parser's recursion allows, I/O)."""
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what + ' ' if what else ''}{path} not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: byte {e.start}: not UTF-8 text ({e.reason})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to parse") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from e


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


def check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    """Refuse keys a schema does not know (typos would otherwise be silent defaults)."""
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; expected one of "
            + ", ".join(sorted(allowed))
        )


def _qemu(q: dict[str, Any], where: str) -> QemuSettings:
    # No check_keys here: deploy (which runs QEMU) may read more [qemu] keys from Board.raw.
    settings = QemuSettings(
        binary=get_key(q, "binary", str, where, "qemu-system-aarch64"),
        machine=get_key(q, "machine", str, where),
        cpu=get_key(q, "cpu", str, where, "cortex-a57"),
        smp=get_key(q, "smp", int, where, 1),
        ram=parse_size(get_key(q, "ram", (str, int), where), f"{where}.ram"),
        carveout=parse_size(get_key(q, "carveout", (str, int), where), f"{where}.carveout"),
        ram_base=get_key(q, "ram_base", int, where, 0x40000000),
    )
    page = 0x200000  # QEMU NUMA nodes and restricted pools want 2 MiB granularity
    for key in ("ram", "carveout"):
        if getattr(settings, key) % page:
            raise ConfigError(
                f"{where}.{key}: {getattr(settings, key):#x} is not a multiple of {page:#x}"
            )
    return settings


#: QEMU virt's free SPIs (0-47 wired, 80-143 its GICv2m frame; 256 SPIs): see qemu-virt.toml.
QEMU_VIRT_FREE_SPIS = (144, 159)


def _dt(d: dict[str, Any], where: str, is_qemu: bool, machine: str = "") -> DtSettings:
    check_keys(d, {"source", "interrupt_controller", "spi_range"}, where)
    source = get_key(d, "source", str, where, "qemu-dumpdtb" if is_qemu else ...)
    if not any(source == s or (s.endswith(":") and source.startswith(s)) for s in _DT_SOURCES):
        raise ConfigError(
            f"{where}.source: expected 'qemu-dumpdtb', 'kernel:<dir>/<name>.dtb' or "
            f"'file:<path>', got {source!r}"
        )
    if source == "qemu-dumpdtb" and not is_qemu:
        raise ConfigError(f"{where}.source: 'qemu-dumpdtb' needs a [qemu] section")
    if source.startswith("kernel:") and not re.fullmatch(
        r"kernel:[a-z0-9_-]+/[A-Za-z0-9_.,+-]+\.dtb", source
    ):
        raise ConfigError(
            f"{where}.source: expected kernel:<vendor-dir>/<name>.dtb "
            f"(as under arch/arm64/boot/dts), got {source!r}"
        )
    ic = get_key(d, "interrupt_controller", str, where, None)
    if ic is not None and not ic.startswith("/"):
        raise ConfigError(f"{where}.interrupt_controller: expected an absolute path, got {ic!r}")
    spi = get_key(d, "spi_range", list, where, None)
    spi_range = QEMU_VIRT_FREE_SPIS if machine.split(",")[0] == "virt" else None
    if spi is not None:
        if (
            len(spi) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in spi)
            or not 0 <= spi[0] <= spi[1] <= 987  # GICv3: SPI INTIDs 32..1019
        ):
            raise ConfigError(
                f"{where}.spi_range: expected [first, last] SPI numbers with "
                f"0 <= first <= last <= 987, got {spi!r}"
            )
        spi_range = (spi[0], spi[1])
    return DtSettings(source, ic, spi_range)


def _ram(entries: Any, where: str) -> tuple[RamRange, ...]:
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: expected [[ram]] tables (base, size)")
    out: list[RamRange] = []
    for i, entry in enumerate(entries):
        w = f"{where}[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{w}: expected a table with base and size")
        check_keys(entry, {"base", "size"}, w)
        r = RamRange(
            parse_address(get_key(entry, "base", (int, str), w), f"{w}.base"),
            parse_size(get_key(entry, "size", (int, str), w), f"{w}.size"),
        )
        for other in out:
            if r.base < other.end and other.base < r.end:
                raise ConfigError(
                    f"{w}: {r.base:#x}+{r.size:#x} overlaps {other.base:#x}+{other.size:#x}"
                )
        out.append(r)
    return tuple(out)


def _console(c: dict[str, Any], where: str) -> ConsoleSettings:
    check_keys(c, {"uart", "kernel", "url", "baudrate"}, where)
    url = get_key(c, "url", str, where, None)
    if url is not None and not (
        url.startswith("/dev/") or re.match(r"(socket|rfc2217|unix|loop)://", url)
    ):
        raise ConfigError(
            f"{where}.url: expected a serial device (/dev/ttyUSB0) or a pyserial URL "
            f"(socket://host:port, rfc2217://host:port, unix:///path), got {url!r}"
        )
    baud = get_key(c, "baudrate", int, where, 115200)
    if baud <= 0:
        raise ConfigError(f"{where}.baudrate: expected a positive integer, got {baud}")
    return ConsoleSettings(
        kernel=get_key(c, "kernel", str, where),
        uart=get_key(c, "uart", str, where, ""),
        url=url,
        baudrate=baud,
    )


def _bootloader(b: dict[str, Any], where: str) -> Bootloader:
    names = ("kernel", "ramdisk", "fdt", "fit", "kernel_comp")
    allowed = {"kind", "prompt"} | {f"{n}_addr_r" for n in names} | {f"{n}_size" for n in names}
    # How to stop autoboot belongs to the U-Boot driver (edgevirt.deploy.target parses it).
    allowed |= {"autoboot", "interrupt", "retries", "loady_baudrate"}
    check_keys(b, allowed, where)
    kind = get_key(b, "kind", str, where)
    if kind != "u-boot":
        raise ConfigError(f"{where}.kind: expected 'u-boot', got {kind!r}")
    addrs: dict[str, int | None] = {}
    loads = []
    for n in names:
        key = f"{n}_addr_r"
        value = b.get(key)
        if value is None and n == "kernel":
            raise ConfigError(f"{where}: missing key 'kernel_addr_r'")
        addrs[key] = None if value is None else parse_address(value, f"{where}.{key}")
        size_key = f"{n}_size"
        size = parse_size(b.get(size_key, _LOAD_SIZES[n]), f"{where}.{size_key}")
        if addrs[key] is not None:
            loads.append(LoadAddress(key, addrs[key] or 0, size))
    return Bootloader(
        kind=kind,
        prompt=get_key(b, "prompt", str, where, "=> "),
        kernel_addr_r=addrs["kernel_addr_r"] or 0,
        ramdisk_addr_r=addrs["ramdisk_addr_r"],
        fdt_addr_r=addrs["fdt_addr_r"],
        fit_addr_r=addrs["fit_addr_r"],
        loads=tuple(loads),
    )


def _boot(data: dict[str, Any], where: str, is_qemu: bool) -> BootChain:
    b = data.get("boot", {})
    check_keys(b, {"chain", "stages"}, where)
    default = "u-boot" if "bootloader" in data else "direct" if is_qemu else ""
    chain = get_key(b, "chain", str, where, default)
    if chain == "" and "chain" not in b:
        return BootChain("")  # a profile for device trees only: deploy refuses it
    if chain not in BOOT_CHAINS:
        raise ConfigError(
            f"{where}.chain: unknown boot chain {chain!r}; expected one of "
            + ", ".join(repr(c) for c in BOOT_CHAINS)
        )
    needs = {"u-boot": "bootloader", "fastboot": "fastboot"}.get(chain)
    if needs is not None and needs not in data:
        raise ConfigError(f"{where}.chain: {chain!r} needs a [{needs}] section in the profile")
    if chain != "u-boot" and "bootloader" in data:
        raise ConfigError(
            f"{where}.chain: {chain!r}, but the profile has a [bootloader] (U-Boot) section"
        )
    if chain == "direct" and not is_qemu:
        raise ConfigError(f"{where}.chain: 'direct' (QEMU -kernel) needs a [qemu] section")
    stages = get_key(b, "stages", list, where, [])
    if not all(isinstance(x, str) and x for x in stages):
        raise ConfigError(f"{where}.stages: expected a list of non-empty strings, got {stages!r}")
    return BootChain(chain, tuple(stages))


def load_board(name_or_path: str) -> Board:
    path = Path(name_or_path)
    if not path.suffix:
        path = boards_dir() / f"{name_or_path}.toml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in boards_dir().glob("*.toml")))
        raise ConfigError(f"board {name_or_path!r} not found ({path}); known boards: {known}")
    data = read_toml(path, "board")
    f = str(path)
    check_keys(data, _TOP_KEYS | _OWN_SECTIONS | _FOREIGN_SECTIONS, f)
    for section in _OWN_SECTIONS - {"ram"}:
        if section in data and not isinstance(data[section], dict):
            raise ConfigError(f"{f}: [{section}] must be a table")
    q = data.get("qemu")
    qemu = _qemu(q, f"{f}: [qemu]") if q is not None else None
    console = _console(get_key(data, "console", dict, f), f"{f}: [console]")
    b = data.get("bootloader")
    return Board(
        name=get_key(data, "name", str, f),
        description=get_key(data, "description", str, f, ""),
        path=path,
        qemu_settings=qemu,
        console_kernel=console.kernel,
        console_uart=console.uart,
        raw=data,
        soc=get_key(data, "soc", str, f, ""),
        dt=_dt(data.get("dt", {}), f"{f}: [dt]", qemu is not None, qemu.machine if qemu else ""),
        ram=_ram(data["ram"], f"{f}: [[ram]]") if "ram" in data else (),
        console=console,
        bootloader=_bootloader(b, f"{f}: [bootloader]") if b is not None else None,
        boot=_boot(data, f"{f}: [boot]", qemu is not None),
    )


def list_boards() -> list[str]:
    """Names of the shipped board profiles."""
    return sorted(p.stem for p in boards_dir().glob("*.toml"))
