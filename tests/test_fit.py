"""FIT images: written as .its, compiled by mkimage; dumpimage and mkimage -l are the oracles."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from edgevirt.errors import ConfigError, ImageError
from edgevirt.image.fit import FitLayout, build_fit, list_fit, verify_fit


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    kernel = tmp_path / "Image"
    # A tiny but well-formed arm64 Image header is enough for mkimage: it copies bytes.
    kernel.write_bytes(bytes(range(256)) * 64)
    ramdisk = tmp_path / "initramfs.cpio.gz"
    ramdisk.write_bytes(b"\x1f\x8b" + b"r" * 5000)
    dts = tmp_path / "t.dts"
    dts.write_text('/dts-v1/;\n/ { compatible = "edgevirt,test"; model = "t"; };\n')
    fdt = tmp_path / "guest.dtb"
    subprocess.run(["dtc", "-I", "dts", "-O", "dtb", "-o", str(fdt), str(dts)], check=True)
    return {"kernel": kernel, "ramdisk": ramdisk, "fdt": fdt}


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_fit_has_three_images_with_sha256_per_dumpimage(tmp_path, inputs):
    itb = build_fit(tmp_path / "guest.itb", **inputs, release="6.1.0")
    listing = subprocess.run(["dumpimage", "-l", str(itb)], capture_output=True, text=True)
    assert listing.returncode == 0
    for name in ("kernel", "ramdisk", "fdt"):
        assert sha(inputs[name]) in listing.stdout
    assert listing.stdout.count("Hash algo:    sha256") == 3
    assert "Load Address: 0x40400000" in listing.stdout
    mk = subprocess.run(["mkimage", "-l", str(itb)], capture_output=True, text=True).stdout
    assert "Default Configuration: 'conf-1'" in mk
    # Extract each image back with dumpimage: byte-identical to what went in.
    for pos, name in enumerate(("kernel", "ramdisk", "fdt")):
        out = tmp_path / f"x{pos}"
        subprocess.run(
            ["dumpimage", "-T", "flat_dt", "-p", str(pos), "-o", str(out), str(itb)], check=True
        )
        assert out.read_bytes() == inputs[name].read_bytes()


def test_fit_is_reproducible(tmp_path, inputs):
    a = build_fit(tmp_path / "a.itb", **inputs)
    b = build_fit(tmp_path / "b.itb", **inputs)
    assert a.read_bytes() == b.read_bytes()


def test_board_addresses_and_64bit_cells(tmp_path, inputs):
    layout = FitLayout(kernel_load=0x80080000, ramdisk_load=0x1_0000_0000)
    itb = build_fit(tmp_path / "g.itb", **inputs, layout=layout)
    images = {i.name: i for i in list_fit(itb)[1]}
    assert images["kernel-1"].load == 0x80080000
    assert "#address-cells = <2>" in (tmp_path / "g.its").read_text()


def test_verify_fit_catches_a_different_input(tmp_path, inputs):
    itb = build_fit(tmp_path / "g.itb", **inputs)
    other = tmp_path / "other"
    other.write_bytes(b"not the ramdisk")
    with pytest.raises(ImageError, match="image ramdisk-1 has sha256 hash"):
        verify_fit(itb, {"ramdisk-1": other})


def test_not_a_dtb_is_refused(tmp_path, inputs):
    with pytest.raises(ImageError, match="not a flattened device tree"):
        build_fit(tmp_path / "g.itb", **{**inputs, "fdt": inputs["ramdisk"]})


def test_not_a_fit(tmp_path, inputs):
    with pytest.raises(ImageError, match="not a FIT image"):
        list_fit(inputs["ramdisk"])


def test_layout_keys_are_checked():
    with pytest.raises(ConfigError, match=r"spec.toml: \[image.fit\]: unknown key 'kernel_addr'"):
        FitLayout.from_table({"kernel_addr": 1}, "spec.toml: [image.fit]")
    with pytest.raises(ConfigError, match=r"kernel_load: expected an address"):
        FitLayout.from_table({"kernel_load": "0x4000"}, "x")
