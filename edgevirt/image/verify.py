"""Check every artefact with pyelftools before it reaches a guest; fail naming the file.

* ``vmlinux``: AArch64, its release (``linux_banner``), and the config it embeds
  (``CONFIG_IKCONFIG``: a gzip blob between ``IKCFG_ST`` and ``IKCFG_ED``) holds the options
  the carve-out needs (:data:`REQUIRED_OPTIONS`).
* ``Image``: the arm64 header (:func:`edgevirt.image.elfcheck.check_arm64_image_header`).
* every ``.ko``: a relocatable AArch64 object whose ``.modinfo`` ``vermagic`` starts with the
  kernel release (the kernel refuses anything else at ``insmod``).
* every ELF inside an initramfs: AArch64, and static or with its interpreter in the archive.
"""

from __future__ import annotations

import gzip
import io
import re
import stat
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from edgevirt.errors import ImageError
from edgevirt.image.cpio import read_cpio
from edgevirt.image.elfcheck import (
    ELF_MAGIC,
    MACHINE_NAMES,
    Arm64ImageHeader,
    check_arm64_image_header,
    check_elf,
)

#: What the guest cannot work without: the restricted pool and its plumbing, virtio-mmio,
#: an initramfs, module loading, and the embedded config itself.
REQUIRED_OPTIONS: dict[str, str] = {
    "CONFIG_DMA_RESTRICTED_POOL": "y",
    "CONFIG_SWIOTLB": "y",
    "CONFIG_OF_RESERVED_MEM": "y",
    "CONFIG_VIRTIO": "y",
    "CONFIG_VIRTIO_MMIO": "y",
    "CONFIG_BLK_DEV_INITRD": "y",
    "CONFIG_MODULES": "y",
    "CONFIG_IKCONFIG": "y",
}
_BANNER = re.compile(rb"Linux version (\S+) \(")


def _elf(data: bytes, label: str) -> ELFFile:
    if data[:4] != ELF_MAGIC:
        raise ImageError(f"{label}: not an ELF file (starts with {data[:4]!r})")
    try:
        return ELFFile(io.BytesIO(data))
    except (ELFError, ValueError) as e:
        raise ImageError(f"{label}: malformed ELF file: {e}") from e


def _machine(elf: ELFFile, label: str) -> None:
    m = str(elf["e_machine"])
    if m != "EM_AARCH64":
        raise ImageError(
            f"{label}: wrong architecture {m} ({MACHINE_NAMES.get(m, '?')}), expected AArch64"
        )


# -- vmlinux and Image -----------------------------------------------------------------------


@dataclass(frozen=True)
class VmlinuxInfo:
    path: str
    release: str
    config: str | None  # the embedded .config, None without IKCONFIG
    options: dict[str, str] = field(default_factory=dict)


def ikconfig(elf: ELFFile, data: bytes) -> str | None:
    """The ``.config`` compiled into the kernel (``kernel/configs.c``), or None."""
    for sec in elf.iter_sections():
        if sec["sh_type"] != "SHT_PROGBITS":
            continue
        blob = sec.data()
        start = blob.find(b"IKCFG_ST")
        if start < 0:
            continue
        end = blob.find(b"IKCFG_ED", start)
        try:
            return gzip.decompress(blob[start + 8 : end]).decode()
        except (OSError, EOFError, zlib.error, UnicodeDecodeError):
            return None
    return None


def _banner_release(elf: ELFFile, data: bytes) -> str | None:
    symtab = elf.get_section_by_name(".symtab")
    if isinstance(symtab, SymbolTableSection):
        for sym in symtab.get_symbol_by_name("linux_banner") or []:
            sec = elf.get_section(sym["st_shndx"])
            off = sym["st_value"] - sec["sh_addr"]
            m = _BANNER.match(sec.data()[off : off + 256])
            if m:
                return m.group(1).decode()
    m = _BANNER.search(data)  # stripped vmlinux: fall back to the string itself
    return m.group(1).decode() if m else None


def verify_vmlinux(
    path: Path,
    *,
    release: str | None = None,
    required: dict[str, str] | None = None,
) -> VmlinuxInfo:
    """AArch64, release as expected, embedded config with the required options."""
    label = str(path)
    data = path.read_bytes()
    elf = _elf(data, label)
    _machine(elf, label)
    found = _banner_release(elf, data)
    if found is None:
        raise ImageError(f"{label}: no 'Linux version' banner: not a kernel vmlinux")
    if release is not None and found != release:
        raise ImageError(f"{label}: release {found}, expected {release} (wrong vmlinux?)")
    config = ikconfig(elf, data)
    options: dict[str, str] = {}
    if config is not None:
        from edgevirt.image.kernel import config_values

        options = config_values(config)
    need = REQUIRED_OPTIONS if required is None else required
    if need:
        if config is None:
            raise ImageError(
                f"{label}: no embedded config (CONFIG_IKCONFIG off): cannot check "
                + ", ".join(need),
                hint="add CONFIG_IKCONFIG=y to a fragment",
            )
        missing = [f"{k}={v} (got {options.get(k, 'n')})" for k, v in need.items()
                   if options.get(k, "n") != v]  # fmt: skip
        if missing:
            raise ImageError(f"{label}: embedded config lacks " + ", ".join(missing))
    return VmlinuxInfo(label, found, config, options)


def image_release(path: Path) -> str:
    """The release in an uncompressed arm64 Image's banner string."""
    m = _BANNER.search(path.read_bytes())
    if not m:
        raise ImageError(f"{path}: no 'Linux version' banner in the Image")
    return m.group(1).decode()


def verify_image(path: Path) -> Arm64ImageHeader:
    hdr = check_arm64_image_header(path)
    if hdr.text_offset % 4096:
        raise ImageError(f"{path}: text_offset {hdr.text_offset:#x} is not page-aligned")
    return hdr


# -- modules ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleInfo:
    path: str
    name: str
    vermagic: str
    license: str
    depends: tuple[str, ...]
    description: str

    @property
    def release(self) -> str:
        return self.vermagic.split()[0] if self.vermagic else ""


def modinfo(elf: ELFFile, label: str) -> dict[str, str]:
    sec = elf.get_section_by_name(".modinfo")
    if sec is None:
        raise ImageError(f"{label}: no .modinfo section: not a kernel module")
    info: dict[str, str] = {}
    for item in sec.data().split(b"\0"):
        k, sep, v = item.decode("utf-8", "replace").partition("=")
        if sep and k not in info:
            info[k] = v
    return info


def verify_module(
    source: Path | bytes, *, release: str | None = None, name: str | None = None
) -> ModuleInfo:
    """A ``.ko`` for AArch64 whose vermagic matches ``release`` (when given)."""
    label = name or str(source)
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    elf = _elf(data, label)
    _machine(elf, label)
    if str(elf["e_type"]) != "ET_REL":
        raise ImageError(f"{label}: ELF type {elf['e_type']}, a module is ET_REL")
    info = modinfo(elf, label)
    vermagic = info.get("vermagic", "")
    mod = ModuleInfo(
        label,
        info.get("name", Path(label).stem),
        vermagic,
        info.get("license", ""),
        tuple(d for d in info.get("depends", "").split(",") if d),
        info.get("description", ""),
    )
    if not vermagic:
        raise ImageError(f"{label}: no vermagic in .modinfo")
    if release is not None and mod.release != release:
        raise ImageError(
            f"{label}: built for kernel {mod.release} (vermagic {vermagic!r}), "
            f"but the image's kernel is {release}",
            hint="rebuild the module against this kernel's tree",
        )
    return mod


# -- initramfs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class InitramfsReport:
    path: str
    entries: int
    elves: dict[str, str]  # guest path -> description
    modules: list[ModuleInfo]


def _resolve(links: dict[str, str], path: str) -> str:
    for _ in range(16):
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            head = "/".join(parts[:i])
            if head in links:
                target = links[head]
                base = (
                    target.lstrip("/")
                    if target.startswith("/")
                    else "/".join([*parts[: i - 1], target])
                )
                path = "/".join(p for p in [base, *parts[i:]] if p and p != ".")
                break
        else:
            return path
    return path


def verify_initramfs(path: Path, *, release: str | None = None) -> InitramfsReport:
    """Every ELF in the archive is AArch64 and runnable there; every .ko fits ``release``."""
    records = read_cpio(path.read_bytes(), source=str(path))
    files = {r.name: r for r in records if stat.S_ISREG(r.mode)}
    links = {r.name: r.data.decode("utf-8", "surrogateescape")
             for r in records if stat.S_ISLNK(r.mode)}  # fmt: skip
    elves: dict[str, str] = {}
    modules: list[ModuleInfo] = []
    for name, rec in sorted(files.items()):
        if rec.data[:4] != ELF_MAGIC:
            continue
        label = f"{path}:/{name}"
        if name.endswith(".ko"):
            mod = verify_module(rec.data, release=release, name=label)
            modules.append(mod)
            elves[name] = f"module {mod.name} vermagic {mod.vermagic}"
            continue
        info = check_elf(rec.data, machine="EM_AARCH64", name=label)
        if info.interpreter is not None:
            interp = _resolve(links, info.interpreter.lstrip("/"))
            if interp not in files:
                raise ImageError(
                    f"{label}: needs interpreter {info.interpreter}, which is not in the archive",
                    hint="use a static binary, or add the loader and its libraries",
                )
        elves[name] = info.describe()
    return InitramfsReport(str(path), len(records), elves, modules)
