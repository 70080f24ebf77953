"""`image inspect` says `verified` only after parsing each artefact in full.

Regression for the defect where a DTB cut to 3000 bytes was printed as `verified` (exit 0):
only the magic had been looked at. Oracles: dtc (builds the DTBs), mkimage/dumpimage (build
and list the FITs), the host's own ELF binaries.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from edgevirt.errors import ImageError
from edgevirt.image.cpio import CpioWriter
from edgevirt.image.fit import build_fit
from edgevirt.image.inspect import inspect_path

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("dtc", "mkimage", "dumpimage")),
    reason="needs dtc and u-boot-tools",
)


def _dtb(tmp: Path, nodes: int = 120) -> Path:
    body = "".join(
        f'  dev@{i:x} {{ compatible = "edgevirt,test-{i}"; reg = <0 {i:#x} 0 0x1000>; '
        f'status = "okay"; }};\n'
        for i in range(nodes)
    )
    src = tmp / "big.dts"
    src.write_text(f"/dts-v1/;\n/ {{\n  #address-cells = <2>;\n  #size-cells = <2>;\n{body}}};\n")
    out = tmp / "big.dtb"
    subprocess.run(["dtc", "-q", "-O", "dtb", "-o", str(out), str(src)], check=True)
    return out


def _arm64_image(size: int = 0x4000, pe: bool = False) -> bytes:
    """A minimal arm64 Image: booting.rst header (4K pages, LE), optionally an EFI stub with
    one PE section covering the rest of the file, and a release banner."""
    img = bytearray(size)
    code0 = 0x5A4D if pe else 0x14000010  # "MZ" or a branch
    struct.pack_into("<IIQQQQQQII", img, 0, code0, 0, 0, size * 2, 0b010, 0, 0, 0, 0x644D5241, 0)
    if pe:
        struct.pack_into("<I", img, 0x3C, 0x40)
        img[0x40:0x44] = b"PE\0\0"
        struct.pack_into("<HH", img, 0x46, 1, 0)  # NumberOfSections at pe+6 (machine first)
        struct.pack_into("<H", img, 0x54, 0)  # SizeOfOptionalHeader at pe+20
        sec = 0x40 + 24
        img[sec : sec + 8] = b".text\0\0\0"
        struct.pack_into("<II", img, sec + 16, size - 0x1000, 0x1000)
    banner = b"Linux version 6.1.0-edgevirt (test) #1 SMP\n\0"
    img[0x2000 : 0x2000 + len(banner)] = banner
    return bytes(img)


@pytest.fixture
def fit_inputs(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "Image").write_bytes(_arm64_image(pe=True))
    w = CpioWriter(mtime=0)
    w.add_file("init", b"#!/bin/sh\n", 0o755)
    w.write_to(tmp_path / "initramfs.cpio.gz")
    return {"kernel": tmp_path / "Image", "ramdisk": tmp_path / "initramfs.cpio.gz",
            "fdt": _dtb(tmp_path, 10)}  # fmt: skip


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgevirt", "image", "inspect", *args],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip


def test_inspect_truncated_dtb_fails_nonzero_instead_of_verified(tmp_path: Path) -> None:
    """Regression: a DTB cut to its first 3000 bytes was printed with `verified`, exit 0."""
    full = _dtb(tmp_path)
    total = struct.unpack_from(">I", full.read_bytes(), 4)[0]
    assert total > 3000
    cut = tmp_path / "cut.dtb"
    cut.write_bytes(full.read_bytes()[:3000])
    with pytest.raises(ImageError, match=rf"cut.dtb: DTB offset 0x4 \(totalsize = {total:#x}\)"):
        inspect_path(cut)
    r = _cli(str(cut))
    assert r.returncode == 1, r.stdout
    assert "verified" not in r.stdout and "truncated" in " ".join(r.stderr.split())
    info = json.loads(_cli(str(full), "--json").stdout)
    assert info["kind"] == "dtb" and info["nodes"] == 121 and info["totalsize"] == total


def test_inspect_dtb_with_a_corrupt_structure_block_fails(tmp_path: Path) -> None:
    blob = bytearray(_dtb(tmp_path).read_bytes())
    token = blob.index(b"dev@5\0") - 4  # FDT_BEGIN_NODE of /dev@5
    assert struct.unpack_from(">I", blob, token)[0] == 1
    struct.pack_into(">I", blob, token, 0x7)  # an unknown token mid-block
    bad = tmp_path / "bad.dtb"
    bad.write_bytes(bytes(blob))
    with pytest.raises(ImageError, match="bad.dtb: DTB offset"):
        inspect_path(bad)


def test_inspect_fit_checks_every_image_like_dumpimage(
    tmp_path: Path, fit_inputs: dict[str, Path]
) -> None:
    itb = build_fit(tmp_path / "g.itb", **fit_inputs)
    info = inspect_path(itb)
    listing = subprocess.run(["dumpimage", "-l", str(itb)], capture_output=True, text=True).stdout
    for img in info["images"]:
        assert img["sha256"] in listing
    want = {hashlib.sha256(p.read_bytes()).hexdigest() for p in fit_inputs.values()}
    assert {i["sha256"] for i in info["images"]} == want
    assert any("DTB parsed" in c for c in info["checks"])
    assert any("PE sections" in c for c in info["checks"])
    assert any("cpio read to the trailer" in c for c in info["checks"])


def test_inspect_truncated_or_altered_fit_fails(
    tmp_path: Path, fit_inputs: dict[str, Path]
) -> None:
    itb = build_fit(tmp_path / "g.itb", **fit_inputs)
    data = itb.read_bytes()
    cut = tmp_path / "cut.itb"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.itb: DTB offset 0x4"):
        inspect_path(cut)
    # one byte flipped inside the kernel's data: the hash names the image
    pos = data.find(fit_inputs["kernel"].read_bytes()[0x2000:0x2010])
    flipped = bytearray(data)
    flipped[pos] ^= 0xFF
    alt = tmp_path / "alt.itb"
    alt.write_bytes(bytes(flipped))
    with pytest.raises(ImageError, match=r"/images/kernel-1/hash-1: sha256 of the \d+-byte data"):
        inspect_path(alt)


def test_inspect_fit_with_external_data_checks_its_end(
    tmp_path: Path, fit_inputs: dict[str, Path]
) -> None:
    itb = build_fit(tmp_path / "g.itb", **fit_inputs)
    ext = tmp_path / "ext.itb"
    subprocess.run(["mkimage", "-E", "-f", "g.its", str(ext)], cwd=tmp_path, check=True,
                   capture_output=True)  # fmt: skip
    info = inspect_path(ext)
    assert {i["sha256"] for i in info["images"]} == {
        i["sha256"] for i in inspect_path(itb)["images"]
    }
    data = ext.read_bytes()
    cut = tmp_path / "extcut.itb"
    cut.write_bytes(data[:-100])
    with pytest.raises(ImageError, match="runs past the end .* \\(truncated\\)"):
        inspect_path(cut)


def test_inspect_truncated_elf_fails(tmp_path: Path) -> None:
    host = Path(sys.executable).resolve()
    data = host.read_bytes()
    assert inspect_path(host)["kind"] == "elf"
    cut = tmp_path / "cut.elf"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageError, match="runs past the end"):
        inspect_path(cut)


def test_inspect_truncated_efi_image_fails(tmp_path: Path) -> None:
    img = tmp_path / "Image"
    img.write_bytes(_arm64_image(pe=True))
    info = inspect_path(img)
    assert info["pe_data_end"] == img.stat().st_size
    img.write_bytes(_arm64_image(pe=True)[:0x3000])
    with pytest.raises(ImageError, match=r"PE section 0 '.text' at 0x1000\+0x3000 runs past"):
        inspect_path(img)
    plain = tmp_path / "plain"
    plain.write_bytes(_arm64_image(pe=False))
    checks = inspect_path(plain)["checks"]
    assert any("no length to check" in c for c in checks), checks
