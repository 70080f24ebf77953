"""Android boot images (``boot.img``) for boards whose firmware boots them (Qualcomm ABL).

Layout (AOSP ``system/tools/mkbootimg``, ``include/bootimg/bootimg.h``, header versions
0-2): one header page, then kernel, ramdisk, second stage, recovery DTBO (v1+) and DTB
(v2), each padded to the page size. The header holds sizes and the physical load addresses
``base + *_offset``, the command line (512 bytes, the rest in ``extra_cmdline``) and an id:
SHA-1 over each section followed by its 32-bit size. :func:`write_bootimg` produces the
same bytes as Debian's ``mkbootimg`` for the same arguments (the tests compare them);
:func:`parse_bootimg` reads one back with every size and offset checked, for ``image
inspect`` and the fake fastboot device.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevirt.errors import ConfigError, ImageError

BOOT_MAGIC = b"ANDROID!"
#: magic, kernel size/addr, ramdisk size/addr, second size/addr, tags addr, page size,
#: header version, os version, name[16], cmdline[512], id[32], extra_cmdline[1024]
_V0 = struct.Struct("<8s10I16s512s32s1024s")
_V1 = struct.Struct("<IQI")  # recovery_dtbo size, offset; header size
_V2 = struct.Struct("<IQ")  # dtb size, dtb (physical) address
HEADER_SIZES = {0: _V0.size, 1: _V0.size + _V1.size, 2: _V0.size + _V1.size + _V2.size}
CMDLINE, EXTRA_CMDLINE = 512, 1024
PAGE_SIZES = (2048, 4096, 8192, 16384)
ARM64_IMAGE_MAGIC = b"ARM\x64"
FDT_MAGIC = b"\xd0\x0d\xfe\xed"


@dataclass(frozen=True)
class BootImgLayout:
    """mkbootimg's ``--base``/``--*_offset``/``--pagesize``/``--header_version``."""

    base: int = 0x10000000
    kernel_offset: int = 0x00008000
    ramdisk_offset: int = 0x01000000
    second_offset: int = 0x00F00000
    tags_offset: int = 0x00000100
    dtb_offset: int = 0x01F00000
    page_size: int = 2048
    header_version: int = 2
    board: str = ""

    @classmethod
    def from_table(cls, t: dict[str, Any], where: str) -> BootImgLayout:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(t) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
        for k, v in t.items():
            want = str if k == "board" else int
            if not isinstance(v, want) or isinstance(v, bool):
                raise ConfigError(f"{where}.{k}: expected {want.__name__}, got {v!r}")
        layout = cls(**t)
        layout.check(where)
        return layout

    def check(self, where: str) -> None:
        if self.page_size not in PAGE_SIZES:
            raise ConfigError(f"{where}.page_size: {self.page_size}, expected one of {PAGE_SIZES}")
        if self.header_version not in HEADER_SIZES:
            raise ConfigError(f"{where}.header_version: {self.header_version}, expected 0, 1 or 2")
        if len(self.board.encode()) >= 16:
            raise ConfigError(f"{where}.board: {self.board!r} is longer than 15 bytes")
        for name in ("base", "kernel_offset", "ramdisk_offset", "second_offset", "tags_offset"):
            if not 0 <= getattr(self, name) <= 0xFFFFFFFF:
                raise ConfigError(f"{where}.{name}: must fit 32 bits")
        if self.base + max(self.kernel_offset, self.ramdisk_offset, self.tags_offset) > 0xFFFFFFFF:
            raise ConfigError(f"{where}: base + offsets exceed the header's 32-bit addresses")


def _pad(n: int, page: int) -> int:
    return (page - n % page) % page


def write_bootimg(
    out: Path,
    *,
    kernel: bytes,
    ramdisk: bytes = b"",
    dtb: bytes = b"",
    cmdline: str = "",
    layout: BootImgLayout | None = None,
) -> Path:
    """Write ``out``; the same bytes as ``mkbootimg`` given the same sections and layout."""
    lay = layout or BootImgLayout()
    lay.check("boot image layout")
    v = lay.header_version
    if dtb and v < 2:
        raise ConfigError(f"a DTB section needs header_version 2 (got {v})")
    raw_cmd = cmdline.encode()
    if len(raw_cmd) > CMDLINE + EXTRA_CMDLINE - 2:
        raise ConfigError(f"kernel command line of {len(raw_cmd)} bytes does not fit (max 1534)")
    if not kernel:
        raise ImageError("boot image: the kernel is empty")
    sha = hashlib.sha1()
    sections = [kernel, ramdisk, b""] + ([b""] if v >= 1 else []) + ([dtb] if v >= 2 else [])
    for data in sections:
        sha.update(data)
        sha.update(struct.pack("<I", len(data)))
    header = _V0.pack(
        BOOT_MAGIC,
        len(kernel),
        lay.base + lay.kernel_offset,
        len(ramdisk),
        lay.base + lay.ramdisk_offset,
        0,
        0,  # second stage: none, and mkbootimg then writes address 0 as well
        lay.base + lay.tags_offset,
        lay.page_size,
        v,
        0,  # os_version / patch level: unset, as mkbootimg without --os_version
        lay.board.encode(),
        raw_cmd[:CMDLINE],
        sha.digest(),
        raw_cmd[CMDLINE:],
    )
    if v >= 1:
        header += _V1.pack(0, 0, HEADER_SIZES[v])
    if v >= 2:
        header += _V2.pack(len(dtb), lay.base + lay.dtb_offset)
    with open(out, "wb") as f:
        f.write(header + bytes(_pad(len(header), lay.page_size)))
        for data in sections:
            f.write(data + bytes(_pad(len(data), lay.page_size)))
    return out


@dataclass(frozen=True)
class BootImg:
    header_version: int
    page_size: int
    kernel: bytes
    ramdisk: bytes
    dtb: bytes
    cmdline: str
    board: str
    kernel_addr: int
    ramdisk_addr: int
    tags_addr: int
    dtb_addr: int

    def summary(self) -> dict[str, Any]:
        return {
            "header_version": self.header_version,
            "page_size": self.page_size,
            "kernel": {"size": len(self.kernel), "addr": hex(self.kernel_addr)},
            "ramdisk": {"size": len(self.ramdisk), "addr": hex(self.ramdisk_addr)},
            "dtb": {"size": len(self.dtb), "addr": hex(self.dtb_addr)},
            "tags_addr": hex(self.tags_addr),
            "cmdline": self.cmdline,
            "name": self.board,
            "kernel_kind": kernel_kind(self.kernel),
        }


def kernel_kind(kernel: bytes) -> str:
    if kernel[56:60] == ARM64_IMAGE_MAGIC:
        return "arm64 Image"
    if kernel[:2] == b"\x1f\x8b":
        return "gzip"
    return "unknown"


def parse_bootimg(data: bytes, name: str = "boot image") -> BootImg:
    """Parse and check an Android boot image (v0-v2); ImageError names what is wrong."""
    if len(data) < _V0.size or data[:8] != BOOT_MAGIC:
        raise ImageError(f"{name}: not an Android boot image (no ANDROID! magic at offset 0)")
    f = _V0.unpack_from(data)
    ksize, kaddr, rsize, raddr, ssize, _saddr, tags, page, version, _osv, board = f[1:12]
    if version not in HEADER_SIZES:
        raise ImageError(f"{name}: header_version {version}, expected 0, 1 or 2")
    if page not in PAGE_SIZES:
        raise ImageError(f"{name}: page_size {page}, expected one of {PAGE_SIZES}")
    cmdline = (f[12].rstrip(b"\0") + f[14].rstrip(b"\0")).decode("utf-8", "replace")
    dtbo_size = dtb_size = dtb_addr = 0
    if version >= 1:
        dtbo_size, _off, hsize = _V1.unpack_from(data, _V0.size)
        if hsize != HEADER_SIZES[version]:
            raise ImageError(f"{name}: header_size {hsize}, expected {HEADER_SIZES[version]}")
    if version >= 2:
        dtb_size, dtb_addr = _V2.unpack_from(data, _V0.size + _V1.size)
    sizes = [("kernel", ksize), ("ramdisk", rsize), ("second", ssize)]
    sizes += [("recovery_dtbo", dtbo_size)] if version >= 1 else []
    sizes += [("dtb", dtb_size)] if version >= 2 else []
    off = page  # the header takes one page
    parts: dict[str, bytes] = {}
    for sec, size in sizes:
        if off + size > len(data):
            raise ImageError(
                f"{name}: {sec} of {size} bytes at offset {off:#x} runs past the end "
                f"({len(data)} bytes)"
            )
        parts[sec] = data[off : off + size]
        off += size + _pad(size, page)
    if ksize == 0:
        raise ImageError(f"{name}: kernel_size is 0")
    return BootImg(
        version,
        page,
        parts["kernel"],
        parts["ramdisk"],
        parts.get("dtb", b""),
        cmdline,
        board.rstrip(b"\0").decode("utf-8", "replace"),
        kaddr,
        raddr,
        tags,
        dtb_addr,
    )
