"""The whole image build (cached kernel, real module, busybox, mkimage), spec and CLI.

Oracles: GNU ``cpio -t`` for the initramfs, ``dumpimage -l`` for the FIT, ``sha256sum``
semantics (hashlib) for the manifest; reproducibility is two builds compared byte by byte.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgevirt.errors import ConfigError, ImageError
from edgevirt.image.build import build_guest_image
from edgevirt.image.inspect import inspect_path
from edgevirt.image.spec import load_image_spec

ROOT = Path(__file__).resolve().parent.parent
DTS = '/dts-v1/;\n/ { compatible = "linux,dummy-virt"; #address-cells = <2>; };\n'


@pytest.fixture(scope="module")
def dtb(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dtb")
    (d / "t.dts").write_text(DTS)
    subprocess.run(["dtc", "-O", "dtb", "-o", str(d / "t.dtb"), str(d / "t.dts")], check=True)
    return d / "t.dtb"


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory, dtb):
    a = build_guest_image("qemu-virt", tmp_path_factory.mktemp("a"), dtb=dtb)
    b = build_guest_image("qemu-virt", tmp_path_factory.mktemp("b"), dtb=dtb)
    return a, b


def cpio_list(path: Path) -> list[str]:
    data = subprocess.run(["gzip", "-dc", str(path)], capture_output=True, check=True).stdout
    r = subprocess.run(["cpio", "-t", "--quiet"], input=data, capture_output=True, check=True)
    return r.stdout.decode().split()


def test_two_builds_are_byte_identical(two_builds):
    a, b = two_builds
    for name in ("initramfs.cpio.gz", "guest.itb", "guest.its", "manifest.json"):
        assert (a.dir / name).read_bytes() == (b.dir / name).read_bytes(), name


def test_manifest_lists_every_artefact_and_input(two_builds):
    img, _ = two_builds
    m = json.loads(img.manifest.read_text())
    arts = m["artefacts"]
    for name in ("Image", "initramfs.cpio.gz", "guest.itb", "guest.dtb", "kernel.config",
                 "modules/edgevirt_dma.ko"):  # fmt: skip
        f = img.dir / name
        assert arts[name] == {"size": f.stat().st_size,
                              "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}  # fmt: skip
    inputs = m["inputs"]
    assert inputs["kernel"]["source"] == "linux-source-6.1"
    assert inputs["kernel"]["fragments"][0]["file"] == "images/kernel/edgevirt.config"
    assert inputs["packages"]["busybox-static:arm64"] not in ("", "?")
    assert inputs["modules"][0]["vermagic"].startswith(img.release)
    assert m["kernel"]["release"] == img.release
    assert str(img.dir) not in img.manifest.read_text(), "no build path in the manifest"


def test_initramfs_holds_busybox_init_agent_and_modules(two_builds):
    img, _ = two_builds
    names = cpio_list(img.initramfs)
    for p in ("init", "bin/busybox", "bin/edgevirt-agent", "lib/modules/edgevirt_dma.ko"):
        assert p in names
    # /init loads whatever is in /lib/modules: the module reaches the guest through it.
    assert "insmod" in (ROOT / "images/initramfs/init").read_text()


def test_fit_carries_the_same_bytes(two_builds):
    img, _ = two_builds
    listing = subprocess.run(["dumpimage", "-l", str(img.fit)], capture_output=True, text=True)
    for f in (img.image, img.initramfs, img.dtb):
        assert hashlib.sha256(f.read_bytes()).hexdigest() in listing.stdout


def test_inspect_verifies_and_catches_tampering(two_builds, tmp_path):
    img, _ = two_builds
    copy = tmp_path / "copy"
    shutil.copytree(img.dir, copy)
    assert inspect_path(copy)["verified"] is True
    assert inspect_path(copy / "guest.itb")["kind"] == "fit"
    assert inspect_path(copy / "Image")["release"] == img.release
    with open(copy / "initramfs.cpio.gz", "r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    with pytest.raises(ImageError, match="initramfs.cpio.gz: sha256 differs"):
        inspect_path(copy)


def test_spec_overlays_files_and_refused_x86_binary(tmp_path, dtb):
    overlay = tmp_path / "rootfs"
    (overlay / "etc").mkdir(parents=True)
    (overlay / "etc/motd").write_text("hello from the overlay\n")
    (tmp_path / "tool.sh").write_text("#!/bin/sh\necho tool\n")
    spec = tmp_path / "system.toml"
    spec.write_text(
        '[vms.guest]\nram = "256M"\n\n'  # another layer's section: ignored here
        '[image]\noverlays = ["rootfs"]\n'
        '[image.files]\n"/usr/local/bin/tool" = { path = "tool.sh", mode = 0o755 }\n'
    )
    img = build_guest_image("qemu-virt", tmp_path / "out", spec=spec)
    assert img.fit is None  # no dtb: no FIT
    names = cpio_list(img.initramfs)
    assert "etc/motd" in names and "usr/local/bin/tool" in names
    m = json.loads(img.manifest.read_text())
    assert m["inputs"]["spec"]["sha256"] == hashlib.sha256(spec.read_bytes()).hexdigest()
    assert m["inputs"]["initramfs"]["overlays"][0]["dir"].endswith("rootfs")
    # An x86 binary in the aarch64 initramfs is refused, naming it.
    shutil.copy("/bin/ls", overlay / "ls")
    with pytest.raises(ImageError, match=r"initramfs.cpio.gz:/ls: wrong architecture"):
        build_guest_image("qemu-virt", tmp_path / "out2", spec=spec)


def test_spec_errors_name_file_and_key(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('[image]\noverlay = ["x"]\n')
    with pytest.raises(ConfigError, match=r"s.toml: \[image\]: unknown key\(s\) overlay"):
        load_image_spec(spec)
    spec.write_text('[image]\nfragments = ["absent.config"]\n')
    with pytest.raises(ConfigError, match=r"\[image\].fragments\[0\]: 'absent.config' does not"):
        load_image_spec(spec)
    spec.write_text('[image.kernel]\nsource = "git"\n')
    with pytest.raises(ConfigError, match=r"kernel.source: 'git' is not"):
        load_image_spec(spec)
    spec.write_text('[image.files]\n"etc/motd" = "s.toml"\n')
    with pytest.raises(ConfigError, match="guest path must be absolute"):
        load_image_spec(spec)
    assert load_image_spec(None).kernel.kind == "debian"


def edgevirt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgevirt", *args], capture_output=True, text=True, cwd=ROOT
    )


def test_cli_build_and_inspect_for_a_real_board_profile(tmp_path, dtb):
    r = edgevirt("image", "build", "--board", "rpi4b", "--dtb", str(dtb), "-o", str(tmp_path),
                 "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["board"] == "rpi4b" and "guest.itb" in info["artefacts"]
    fit = json.loads(edgevirt("image", "inspect", str(tmp_path / "guest.itb"), "--json").stdout)
    kernel = next(i for i in fit["images"] if i["name"] == "kernel-1")
    assert kernel["load"] == "0x80000"  # rpi4b's U-Boot kernel_addr_r
    r = edgevirt("image", "inspect", str(tmp_path))
    assert r.returncode == 0 and "verified" in r.stdout


def test_cli_inspect_refuses_a_host_binary_as_module():
    r = edgevirt("image", "inspect", "/bin/ls", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["machine"] == "EM_X86_64"
    r = edgevirt("image", "inspect", "/etc/hostname")
    assert r.returncode == 1 and "unknown artefact" in " ".join(r.stderr.split())


def test_cli_bad_spec_exit_4(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text("[image]\nbogus = 1\n")
    r = edgevirt("image", "build", "--spec", str(spec), "-o", str(tmp_path / "o"), "--no-fit")
    assert r.returncode == 4 and "bogus" in r.stderr


@pytest.mark.e2e
def test_two_cli_builds_are_byte_identical_in_every_artefact(tmp_path):
    """`edgevirt image build --board qemu-virt` twice: every file, and every artefact the
    manifest lists, is byte-identical; QEMU's per-run boot seeds are not frozen in."""
    from edgevirt.devicetree.fdt import Fdt

    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        r = subprocess.run(
            [sys.executable, "-m", "edgevirt", "image", "build", "--board", "qemu-virt",
             "-o", str(d)],
            capture_output=True, text=True, timeout=600, cwd=ROOT,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
    files = sorted(p.relative_to(dirs[0]) for p in dirs[0].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(dirs[1]) for p in dirs[1].rglob("*") if p.is_file())
    listed = json.loads((dirs[0] / "manifest.json").read_text())["artefacts"]
    assert set(listed) <= {str(f) for f in files}
    for name in ("guest.dtb", "qemu-virt.raw.dtb", "guest.itb"):
        assert name in {str(f) for f in files}, name
    differ = [str(f) for f in files if (dirs[0] / f).read_bytes() != (dirs[1] / f).read_bytes()]
    assert not differ, differ
    for dtb in ("guest.dtb", "qemu-virt.raw.dtb"):
        chosen = Fdt.from_file(dirs[0] / dtb).get("/chosen")
        for seed in ("rng-seed", "kaslr-seed"):
            prop = chosen.get(seed)
            assert prop is None or set(prop.value) <= {0}, f"{dtb}: {seed} frozen in"
