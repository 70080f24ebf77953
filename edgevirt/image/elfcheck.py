"""Check what a binary is before it goes into a guest image.

* :func:`check_elf`: machine, class and linkage of an ELF file (pyelftools). Busybox in the
  initramfs must be AArch64 and static: there is no libc and no loader in the guest.
* :func:`check_arm64_image_header`: the 64-byte header of an arm64 Linux ``Image``
  (``Documentation/arch/arm64/booting.rst``): ``code0 code1 text_offset image_size flags
  res2 res3 res4 magic res5``, magic ``ARM\\x64`` at offset 0x38.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.segments import InterpSegment

from edgevirt.errors import ImageError

ELF_MAGIC = b"\x7fELF"

#: Friendly names for the machines edgevirt meets.
MACHINE_NAMES = {
    "EM_AARCH64": "AArch64",
    "EM_ARM": "ARM (32-bit)",
    "EM_X86_64": "x86-64",
    "EM_386": "i386",
    "EM_RISCV": "RISC-V",
}


@dataclass(frozen=True)
class ElfInfo:
    name: str  # the file, or "<bytes>"
    machine: str  # e_machine as pyelftools names it: "EM_AARCH64"
    elfclass: int  # 32 or 64
    little_endian: bool
    type: str  # e_type: "ET_EXEC", "ET_DYN" (PIE or shared object), "ET_REL"
    interpreter: str | None  # PT_INTERP, None for a static binary

    @property
    def static(self) -> bool:
        return self.interpreter is None

    def describe(self) -> str:
        link = "static" if self.static else f"dynamic ({self.interpreter})"
        return (
            f"ELF{self.elfclass} {MACHINE_NAMES.get(self.machine, self.machine)} {self.type} {link}"
        )


def _load(source: str | os.PathLike[str] | bytes, name: str | None) -> tuple[str, bytes]:
    if isinstance(source, bytes | bytearray | memoryview):
        return name or "<bytes>", bytes(source)
    path = Path(source)
    try:
        return name or str(path), path.read_bytes()
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e.strerror}") from e


def check_elf(
    source: str | os.PathLike[str] | bytes,
    *,
    machine: str | None = "EM_AARCH64",
    static_ok: bool = True,
    require_static: bool = False,
    name: str | None = None,
) -> ElfInfo:
    """Parse an ELF header and check it.

    ``machine``: the expected ``e_machine`` (pyelftools name, e.g. ``"EM_AARCH64"``), or
    None for any. ``static_ok=False`` refuses static binaries, ``require_static=True``
    refuses dynamic ones. ``name`` labels bytes in error messages.
    """
    label, data = _load(source, name)
    if data[:4] != ELF_MAGIC:
        raise ImageError(
            f"{label}: not an ELF file (starts with {data[:4]!r}, expected {ELF_MAGIC!r})"
        )
    try:
        elf = ELFFile(io.BytesIO(data))
        found = str(elf["e_machine"])
        interp: str | None = None
        for seg in elf.iter_segments():
            if isinstance(seg, InterpSegment):
                interp = seg.get_interp_name()
        info = ElfInfo(label, found, elf.elfclass, elf.little_endian, str(elf["e_type"]), interp)
    except (ELFError, struct.error, ValueError, KeyError) as e:
        raise ImageError(f"{label}: malformed ELF file: {e}") from e
    if machine is not None and info.machine != machine:
        raise ImageError(
            f"{label}: wrong architecture: found {info.machine} "
            f"({MACHINE_NAMES.get(info.machine, '?')}), expected {machine} "
            f"({MACHINE_NAMES.get(machine, '?')})",
            hint="use the guest architecture's package (e.g. busybox-static:arm64)",
        )
    if info.static and not static_ok:
        raise ImageError(f"{label}: is statically linked; a dynamic binary was expected")
    if require_static and not info.static:
        raise ImageError(
            f"{label}: is dynamically linked (interpreter {info.interpreter}); "
            "a static binary is required (the guest image has no libc or loader)",
            hint="use busybox-static, not busybox",
        )
    return info


# -- arm64 Linux Image -----------------------------------------------------------------------

ARM64_IMAGE_MAGIC = 0x644D5241  # "ARM\x64", little-endian at offset 0x38
ARM64_HEADER = struct.Struct("<IIQQQQQQII")  # booting.rst, 64 bytes
ARM64_MAGIC_OFFSET = 0x38
#: text_offset when image_size is 0 (kernels before 3.17).
ARM64_LEGACY_TEXT_OFFSET = 0x80000


@dataclass(frozen=True)
class Arm64ImageHeader:
    code0: int
    code1: int
    text_offset: int
    image_size: int  # effective size including bss; 0 on kernels before 3.17
    flags: int
    file_size: int

    @property
    def big_endian(self) -> bool:
        return bool(self.flags & 1)

    @property
    def page_size(self) -> int | None:
        """Kernel page size from flags bits 1-2 (None: unspecified)."""
        return {1: 4096, 2: 16384, 3: 65536}.get((self.flags >> 1) & 3)

    @property
    def efi_stub(self) -> bool:
        """code0 starts with "MZ" when the kernel carries a PE/COFF header (EFI stub)."""
        return self.code0 & 0xFFFF == 0x5A4D


def check_arm64_image_header(source: str | os.PathLike[str] | bytes) -> Arm64ImageHeader:
    """Parse and check the arm64 Linux ``Image`` header; ImageError if it is not one."""
    label, data = _load(source, None)
    if data[:2] == b"\x1f\x8b":
        raise ImageError(
            f"{label}: is gzip-compressed (Image.gz); an uncompressed arm64 Image is expected",
            hint="gunzip it, or use arch/arm64/boot/Image",
        )
    if data[:4] == ELF_MAGIC:
        raise ImageError(
            f"{label}: is an ELF file (vmlinux?); the raw arm64 Image is expected",
            hint="use arch/arm64/boot/Image, not vmlinux",
        )
    if len(data) < ARM64_HEADER.size:
        raise ImageError(
            f"{label}: {len(data)} bytes, too short for the "
            f"{ARM64_HEADER.size}-byte arm64 Image header"
        )
    code0, code1, text_offset, image_size, flags, _r2, _r3, _r4, magic, _r5 = (
        ARM64_HEADER.unpack_from(data)
    )
    if magic != ARM64_IMAGE_MAGIC:
        raise ImageError(
            f"{label}: no arm64 Image magic at offset {ARM64_MAGIC_OFFSET:#x}: "
            f"found {data[ARM64_MAGIC_OFFSET : ARM64_MAGIC_OFFSET + 4]!r}, "
            f"expected b'ARM\\x64'"
        )
    if image_size == 0:
        text_offset = ARM64_LEGACY_TEXT_OFFSET
    elif image_size < len(data):
        raise ImageError(
            f"{label}: header image_size {image_size:#x} is smaller than the "
            f"file ({len(data):#x} bytes): truncated header or wrong file"
        )
    if flags & 1:
        raise ImageError(
            f"{label}: big-endian kernel (flags {flags:#x}); edgevirt guests are little-endian"
        )
    return Arm64ImageHeader(code0, code1, text_offset, image_size, flags, len(data))


# -- "parsed in full": every part a header points to lies inside the file ----------------------


def check_elf_layout(data: bytes, label: str) -> int:
    """Every section and segment the headers declare lies within ``data`` (a truncated ELF
    fails here, not later); returns the number of sections checked."""
    try:
        elf = ELFFile(io.BytesIO(data))
        size = len(data)
        for what, off, count, entsize in (
            ("section header table", elf["e_shoff"], elf["e_shnum"], elf["e_shentsize"]),
            ("program header table", elf["e_phoff"], elf["e_phnum"], elf["e_phentsize"]),
        ):
            if count and off + count * entsize > size:
                raise ImageError(
                    f"{label}: {what} at {off:#x} ({count} × {entsize} bytes) runs past the "
                    f"end of the {size:#x}-byte file (truncated)"
                )
        n = 0
        for i, sec in enumerate(elf.iter_sections()):
            if sec["sh_type"] != "SHT_NOBITS" and sec["sh_offset"] + sec["sh_size"] > size:
                raise ImageError(
                    f"{label}: section {i} {sec.name!r} at {sec['sh_offset']:#x}+"
                    f"{sec['sh_size']:#x} runs past the end of the {size:#x}-byte file"
                )
            n += 1
        for i, seg in enumerate(elf.iter_segments()):
            if seg["p_offset"] + seg["p_filesz"] > size:
                raise ImageError(
                    f"{label}: segment {i} at {seg['p_offset']:#x}+{seg['p_filesz']:#x} runs "
                    f"past the end of the {size:#x}-byte file"
                )
        return n
    except (ELFError, struct.error, ValueError, KeyError) as e:
        raise ImageError(f"{label}: malformed ELF file: {e}") from e


def check_pe_sections(data: bytes, label: str) -> int:
    """An EFI-stub arm64 Image carries a PE/COFF header: each section's raw data must lie in
    the file (the Image header itself has no length for its data). Returns the end of the
    last section's raw data."""

    def u(fmt: str, off: int, what: str) -> int:
        if off < 0 or off + struct.calcsize(fmt) > len(data):
            raise ImageError(f"{label}: PE/COFF {what} at {off:#x} is past the end of the file")
        return int(struct.unpack_from(fmt, data, off)[0])

    pe = u("<I", 0x3C, "header offset")
    if data[pe : pe + 4] != b"PE\0\0":
        raise ImageError(f"{label}: EFI stub without a PE signature at {pe:#x}")
    nsec = u("<H", pe + 6, "NumberOfSections")
    opt = u("<H", pe + 20, "SizeOfOptionalHeader")
    table = pe + 24 + opt
    end = 0
    for i in range(nsec):
        raw_size = u("<I", table + 40 * i + 16, f"section {i} SizeOfRawData")
        raw_ptr = u("<I", table + 40 * i + 20, f"section {i} PointerToRawData")
        if raw_ptr + raw_size > len(data):
            name = (
                data[table + 40 * i : table + 40 * i + 8].rstrip(b"\0").decode("ascii", "replace")
            )
            raise ImageError(
                f"{label}: PE section {i} {name!r} at {raw_ptr:#x}+{raw_size:#x} runs past the "
                f"end of the {len(data):#x}-byte Image (truncated)"
            )
        end = max(end, raw_ptr + raw_size)
    return end
