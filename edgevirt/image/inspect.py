"""``edgevirt image inspect PATH``: recognise any artefact, verify it, describe it as a dict.

A build directory or ``manifest.json`` (every artefact's size and sha256 re-checked), a FIT
(``dumpimage -l``), a DTB, a ``vmlinux`` (release, embedded config, required options), a
``.ko`` (vermagic), any other ELF, an arm64 ``Image`` (header, release), an initramfs (every
ELF inside), an Android boot image (every section), an SD-card image (partitions, files).
Verification failures raise :class:`ImageError` naming the file.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from elftools.elf.elffile import ELFFile

from edgevirt.errors import ImageError
from edgevirt.image.bootimg import BOOT_MAGIC, parse_bootimg
from edgevirt.image.elfcheck import ARM64_MAGIC_OFFSET, ELF_MAGIC, check_elf
from edgevirt.image.fit import list_fit
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
        return {
            "kind": "arm64-image",
            "path": str(path),
            "release": image_release(path),
            "text_offset": hdr.text_offset,
            "image_size": hdr.image_size,
            "file_size": hdr.file_size,
            "page_size": hdr.page_size,
            "efi_stub": hdr.efi_stub,
        }
    if head[:2] == b"\x1f\x8b" or head[:6] == b"070701":
        rep = verify_initramfs(path, release=release)
        return {
            "kind": "initramfs",
            "path": str(path),
            "entries": rep.entries,
            "elf": rep.elves,
            "modules": [m.name for m in rep.modules],
        }
    if partitions(head):  # last: an MBR has no magic beyond its 0x55aa signature
        return inspect_card(path)
    raise ImageError(
        f"{path}: unknown artefact (not a FIT, DTB, ELF, arm64 Image, initramfs, boot image, "
        "SD card or manifest)"
    )


def _fdt(path: Path) -> dict[str, Any]:
    try:
        desc, images = list_fit(path)
    except ImageError:
        return {"kind": "dtb", "path": str(path), "size": path.stat().st_size}
    return {
        "kind": "fit",
        "path": str(path),
        "description": desc,
        "images": [
            {"name": i.name, "type": i.type, "size": i.size, i.hash_algo or "hash": i.hash}
            | ({"load": hex(i.load)} if i.load is not None else {})
            for i in images
        ],
    }


def _elf(path: Path, release: str | None) -> dict[str, Any]:
    data = path.read_bytes()
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
        }
    info = check_elf(path, machine=None)
    return {"kind": "elf", "path": str(path), "describe": info.describe(),
            "machine": info.machine, "static": info.static}  # fmt: skip


def inspect_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ImageError(f"{path}: not a readable JSON manifest: {e}") from e
    if not isinstance(manifest, dict) or "artefacts" not in manifest:
        raise ImageError(f"{path}: not an edgevirt image manifest (no 'artefacts')")
    bad = []
    for name, want in sorted(manifest["artefacts"].items()):
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
    }
