"""Kernel inputs, config checks and the cache: the Kconfig explainer runs on the real tree.

The kernel tree is the cached build (``build_kernel()`` returns it without rebuilding); the
failure-path tests use a fake "kernel" tree in a private cache so nothing real is touched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edgevirt.errors import ImageError, SetupError
from edgevirt.image import kconfig
from edgevirt.image import kernel as kmod
from edgevirt.image.kernel import KernelSource, build_kernel, check_config, config_values


@pytest.fixture(scope="module")
def kb() -> kmod.KernelBuild:
    return build_kernel()


@pytest.fixture(scope="module")
def index(kb: kmod.KernelBuild) -> kconfig.KconfigIndex:
    return kconfig.load(kb.source)


@pytest.fixture
def private_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("EDGEVIRT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_fragments_live_in_images_kernel_and_keep_the_cache_key(kb):
    frags = kmod.default_fragments()
    assert frags and all(f.parent.name == "kernel" for f in frags)
    # The fragment moved to images/kernel/ byte-for-byte: the cached build is still found.
    assert kmod.cache_key(frags) == kb.key
    assert kb.meta.get("release", kb.release) == kb.release


def test_cache_key_follows_every_input(tmp_path, kb):
    extra = tmp_path / "extra.config"
    extra.write_text("CONFIG_SCSI=y\n")
    base = kmod.default_fragments()
    assert kmod.cache_key([*base, extra]) != kmod.cache_key(base)
    tarball = tmp_path / "linux.tar.xz"
    tarball.write_bytes(b"not really")
    assert kmod.cache_key(base, KernelSource("tarball", tarball)) != kmod.cache_key(base)
    tarball.write_bytes(b"changed")
    k1 = kmod.cache_key(base, KernelSource("tarball", tarball))
    tarball.write_bytes(b"changed again")
    assert kmod.cache_key(base, KernelSource("tarball", tarball)) != k1


def test_dropped_option_names_the_blocking_dependency(kb):
    have = kb.config.read_text()
    wanted = {"CONFIG_VIRTIO": "y", "CONFIG_SCSI_VIRTIO": "y", "CONFIG_DRM_VIRTIO_GPU": "y"}
    with pytest.raises(ImageError) as ei:
        check_config(have, wanted, "user.config", tree=kb.source)
    msg = str(ei.value)
    assert "2 option(s)" in msg
    assert "CONFIG_SCSI_VIRTIO=y (got n)" in msg and "SCSI=n" in msg
    assert "depends on DRM && VIRTIO_MENU && MMU" in msg and "DRM=n" in msg
    assert "drivers/" in msg  # the Kconfig file and line that declares it


def test_option_that_does_not_exist_is_named(kb):
    with pytest.raises(ImageError, match=r"CONFIG_VIRTIO_MMIOO=y \(got n\): no such option"):
        check_config(kb.config.read_text(), {"CONFIG_VIRTIO_MMIOO": "y"}, "f", tree=kb.source)


def test_selected_only_option_is_explained(index, kb):
    have = config_values(kb.config.read_text())
    have["CONFIG_SWIOTLB"] = "n"
    assert "only another option's `select`" in kconfig.explain(index, "CONFIG_SWIOTLB", "y", have)


def test_every_edgevirt_option_is_set_in_the_cached_config(kb, index):
    wanted = kmod.read_fragments(kmod.default_fragments())
    check_config(kb.config.read_text(), wanted, "edgevirt", tree=kb.source)  # no raise
    assert all(index.get(k) for k in wanted), "every fragment option exists in Kconfig"


@pytest.mark.parametrize(
    ("expr", "want"),
    [
        ("A && B", 0),
        ("A || B", 2),
        ("!B", 2),
        ("A && C", 1),
        ("!C", 1),
        ("A && !(B || C=m)", 0),
        ('S = "x"', 2),
        ("UNDEFINED", 0),
    ],
)
def test_tristate_logic(expr, want):
    values = {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": "m", "CONFIG_S": '"x"'}
    assert kconfig.evaluate(expr, values) == want


# -- failure paths: the cache stays untouched ------------------------------------------------


def fake_kernel_tree(root: Path, make_body: str = "\texit 2\n") -> Path:
    root.mkdir()
    (root / "Makefile").write_text(
        "VERSION = 6\nPATCHLEVEL = 1\nSUBLEVEL = 0\n\nallnoconfig:\n" + make_body
    )
    (root / "Kconfig").write_text('config A\n\tbool "a"\n')
    (root / "arch/arm64").mkdir(parents=True)
    (root / "arch/arm64/Kconfig").write_text("")
    return root


def test_failed_build_leaves_the_cache_untouched(tmp_path, private_cache):
    tree = fake_kernel_tree(tmp_path / "linux")
    frag = tmp_path / "f.config"
    frag.write_text("CONFIG_A=y\n")
    src = KernelSource("tree", tree)
    key = kmod.cache_key([frag], src)
    # A good entry for exactly these inputs exists; --rebuild fails; the entry survives.
    good = private_cache / "kernel" / key
    good.mkdir(parents=True)
    (good / "Image").write_bytes(b"good")
    (good / "meta.json").write_text(json.dumps({"key": key}))
    with pytest.raises(ImageError, match="allnoconfig` failed"):
        build_kernel(fragments=[frag], source=src, force=True)
    assert (good / "Image").read_bytes() == b"good"
    # The build lock's file stays (an flock dies with its holder); no staging dir does.
    leftovers = [p.name for p in (private_cache / "kernel").iterdir()]
    assert sorted(leftovers) == sorted([key, f"failed-{key}.log", f".lock-{key}"])
    assert not (tree / ".config").exists(), "the user's tree is never built in place"


def test_failed_first_build_creates_no_entry(tmp_path, private_cache):
    tree = fake_kernel_tree(tmp_path / "linux")
    with pytest.raises(ImageError):
        build_kernel(fragments=kmod.default_fragments(), source=KernelSource("tree", tree))
    assert not any(p.is_dir() for p in (private_cache / "kernel").iterdir())


def test_source_that_is_not_a_kernel(tmp_path, private_cache):
    notk = tmp_path / "project"
    notk.mkdir()
    (notk / "Makefile").write_text("all:\n\ttrue\n")
    with pytest.raises(ImageError, match="is not a Linux kernel source"):
        build_kernel(source=KernelSource("tree", notk))


def test_missing_tools_name_the_apt_package(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SetupError) as ei:
        kmod.check_tools()
    assert "aarch64-linux-gnu-gcc (apt package gcc-aarch64-linux-gnu)" in str(ei.value)
    assert "apt-get install" in (ei.value.hint or "")


def test_no_disk_space_is_a_clear_error(tmp_path):
    with pytest.raises(SetupError, match=r"no disk space .* GiB free in"):
        kmod.check_space(tmp_path, need=1 << 62)


def test_prebuilt_image_is_checked_not_built(tmp_path, private_cache, kb):
    bad = tmp_path / "Image"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(ImageError, match="no arm64 Image magic"):
        build_kernel(source=KernelSource("prebuilt", bad))
    pre = build_kernel(source=KernelSource("prebuilt", kb.image, kb.vmlinux))
    assert pre.release == kb.release and not pre.has_tree
    assert pre.image.read_bytes() == kb.image.read_bytes()
