"""``edgevirt image inspect PATH``: recognise any artefact, verify it, describe it as a dict.

Each kind is parsed in full before it is called verified, and ``checks`` lists what was
checked: a build directory or ``manifest.json`` (every artefact's size and sha256), a FIT
(every image's data against its hash nodes; its DTBs parsed, its arm64 kernel's header and
PE sections, its initramfs read to the trailer), a DTB (the whole structure block, strings and
reservation map), an ELF (every section and segment inside the file; a ``vmlinux``'s release,
config and required options; a ``.ko``'s vermagic), an arm64 ``Image`` (header, banner, and
with an EFI stub its PE sections), an initramfs (every record to the trailer, every ELF
inside), an Android boot image (every section), an SD-card image (partitions, files).
Verification failures raise :class:`ImageError` naming the file.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

from elftools.elf.elffile import ELFFile

from edgevirt.devicetree.fdt import Fdt
from edgevirt.errors import DeviceTreeError, ImageError
from edgevirt.image.bootimg import BOOT_MAGIC, parse_bootimg
from edgevirt.image.cpio import read_cpio
from edgevirt.image.elfcheck import (
    ARM64_MAGIC_OFFSET,
    ELF_MAGIC,
    check_arm64_image_header,
    check_elf,
    check_elf_layout,
    check_pe_sections,
)
from edgevirt.image.fit import is_fit, read_fit
from edgevirt.image.kernel import file_sha256
from edgevirt.image.sdcard import inspect_card, partitions
from edgevirt.image.verify import (
    REQUIRED_OPTIONS,
    image_release,
    verify_image,
    verify_initramfs,
    verify_module,
    verify_vmlinux,
)

FDT_MAGIC = b"\xd0\x0d\xfe\xed"


def inspect_path(path: Path, *, release: str | None = None) -> dict[str, Any]:
    if path.is_dir():
        manifest = path / "manifest.json"
        if not manifest.is_file():
            raise ImageError(f"{path}: a directory without manifest.json (not a build dir)")
        return inspect_manifest(manifest)
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e.strerror}") from e
    if path.suffix == ".json":
        return inspect_manifest(path)
    if head[:8] == BOOT_MAGIC:
        return {"kind": "android-boot-image", "path": str(path)} | parse_bootimg(
            path.read_bytes(), str(path)
        ).summary()
    if head[:4] == FDT_MAGIC:
        return _fdt(path)
    if head[:4] == ELF_MAGIC:
        return _elf(path, release)
    if head[ARM64_MAGIC_OFFSET : ARM64_MAGIC_OFFSET + 4] == b"ARM\x64":
        hdr = verify_image(path)
        checks = ["header (magic, text_offset, image_size, flags)", "release banner"]
        info: dict[str, Any] = {
            "kind": "arm64-image",
            "path": str(path),
            "release": image_release(path),
            "text_offset": hdr.text_offset,
            "image_size": hdr.image_size,
            "file_size": hdr.file_size,
            "page_size": hdr.page_size,
            "efi_stub": hdr.efi_stub,
        }
        if hdr.efi_stub:
            info["pe_data_end"] = check_pe_sections(path.read_bytes(), str(path))
            checks.append("PE/COFF sections inside the file")
        else:
            checks.append("no EFI stub: the Image format has no length to check its end against")
        return info | {"checks": checks}
    if head[:2] == b"\x1f\x8b" or head[:6] == b"070701":
        rep = verify_initramfs(path, release=release)
        return {
            "kind": "initramfs",
            "path": str(path),
            "entries": rep.entries,
            "elf": rep.elves,
            "modules": [m.name for m in rep.modules],
            "checks": ["every cpio record up to the trailer", "every ELF inside (AArch64, "
                       "interpreter present)", "every module's vermagic"],
        }  # fmt: skip
    if partitions(head):  # last: an MBR has no magic beyond its 0x55aa signature
        return inspect_card(path)
    raise ImageError(
        f"{path}: unknown artefact (not a FIT, DTB, ELF, arm64 Image, initramfs, boot image, "
        "SD card or manifest)"
    )


def _fdt(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    try:
        fdt = Fdt.from_bytes(data)
    except DeviceTreeError as e:
        raise ImageError(f"{path}: {e}") from e
    if is_fit(fdt):
        return _fit(path, data)
    _, total, *_, version = struct.unpack_from(">6I", data)
    walk = list(fdt.walk())
    info: dict[str, Any] = {
        "kind": "dtb",
        "path": str(path),
        "size": len(data),
        "totalsize": total,
        "version": version,
        "nodes": len(walk),
        "properties": sum(len(n.properties) for _, n in walk),
        "memreserve": len(fdt.memreserve),
    }
    if len(data) > total:
        info["trailing_bytes"] = len(data) - total
    checks = ["header", "structure block to FDT_END", "strings", "memory reservation map"]
    return info | {"checks": checks}


def _fit(path: Path, data: bytes) -> dict[str, Any]:
    fit = read_fit(data, source=str(path))
    checks = [f"{len(fit.images)} images against their hash nodes", "configurations"]
    for name, (kind, arch, compression) in fit.types.items():
        blob, label = fit.data[name], f"{path}: /images/{name}"
        try:
            if kind == "flat_dt":
                Fdt.from_bytes(blob)
                checks.append(f"{name}: DTB parsed")
            elif kind == "kernel" and arch == "arm64" and compression == "none":
                hdr = check_arm64_image_header(blob)
                if hdr.efi_stub:
                    check_pe_sections(blob, label)
                checks.append(f"{name}: arm64 Image header" + (", PE sections" * hdr.efi_stub))
            elif kind == "ramdisk" and (blob[:2] == b"\x1f\x8b" or blob[:6] == b"070701"):
                read_cpio(blob, source=label)
                checks.append(f"{name}: cpio read to the trailer")
        except DeviceTreeError as e:
            raise ImageError(f"{label}: {e}") from e
        except ImageError as e:
            raise ImageError(f"{label}: {e}") from e
    return {
        "kind": "fit",
        "path": str(path),
        "description": fit.description,
        "default": fit.default,
        "images": [
            {"name": i.name, "type": i.type, "size": i.size, i.hash_algo or "hash": i.hash}
            | ({"load": hex(i.load)} if i.load is not None else {})
            for i in fit.images
        ],
        "checks": checks,
    }


def _elf(path: Path, release: str | None) -> dict[str, Any]:
    data = path.read_bytes()
    sections = check_elf_layout(data, str(path))
    checks = [f"{sections} sections and every segment inside the file"]
    try:
        elf = ELFFile(io.BytesIO(data))
        is_module = elf.get_section_by_name(".modinfo") is not None
    except Exception as e:  # pyelftools raises many types on corrupt input
        raise ImageError(f"{path}: malformed ELF file: {e}") from e
    if is_module:
        m = verify_module(path, release=release)
        return {
            "kind": "module",
            "path": str(path),
            "name": m.name,
            "vermagic": m.vermagic,
            "release": m.release,
            "license": m.license,
            "depends": list(m.depends),
            "description": m.description,
            "checks": [*checks, "AArch64 ET_REL", "vermagic" + (" = release" * bool(release))],
        }
    if b"Linux version " in data:
        v = verify_vmlinux(path, release=release)
        return {
            "kind": "vmlinux",
            "path": str(path),
            "release": v.release,
            "machine": "AArch64",
            "ikconfig": v.config is not None,
            "options": {k: v.options.get(k, "n") for k in REQUIRED_OPTIONS},
            "config_options": len(v.options),
            "checks": [*checks, "AArch64", "banner release", "embedded config options"],
        }
    info = check_elf(path, machine=None)
    return {"kind": "elf", "path": str(path), "describe": info.describe(),
            "machine": info.machine, "static": info.static, "checks": checks}  # fmt: skip


def inspect_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ImageError(f"{path}: not a readable JSON manifest: {e}") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("artefacts"), dict):
        raise ImageError(f"{path}: not an edgevirt image manifest (no 'artefacts' table)")
    bad = []
    for name, want in sorted(manifest["artefacts"].items()):
        if not isinstance(want, dict) or name.startswith("/") or ".." in name.split("/"):
            bad.append(f"{name}: not a file of this build with its size and sha256")
            continue
        f = path.parent / name
        if not f.is_file():
            bad.append(f"{name}: missing")
        elif f.stat().st_size != want.get("size"):
            bad.append(f"{name}: size {f.stat().st_size}, manifest says {want.get('size')}")
        elif want.get("sha256") and file_sha256(f) != want["sha256"]:
            bad.append(f"{name}: sha256 differs from the manifest")
    if bad:
        raise ImageError(f"{path}: artefacts do not match: " + "; ".join(bad))
    return {
        "kind": "manifest",
        "path": str(path),
        "board": manifest.get("board"),
        "kernel": manifest.get("kernel"),
        "artefacts": manifest["artefacts"],
        "verified": True,
        "checks": ["every artefact's size and sha256 against the manifest"],
    }
