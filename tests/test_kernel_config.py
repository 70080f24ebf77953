"""Kernel inputs, config checks and the cache: the Kconfig explainer runs on the real tree.

The kernel tree is the cached build (``build_kernel()`` returns it without rebuilding); the
failure-path tests use a fake "kernel" tree in a private cache so nothing real is touched.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
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


def test_dropped_option_names_the_blocking_dependency(kb, index):
    have = kb.config.read_text()
    wanted = {"CONFIG_VIRTIO": "y", "CONFIG_SCSI_VIRTIO": "y", "CONFIG_DRM_VIRTIO_GPU": "y"}
    with pytest.raises(ImageError) as ei:
        check_config(have, wanted, "user.config", tree=kb.source, index=index)
    msg = str(ei.value)
    assert "2 option(s)" in msg
    assert "CONFIG_SCSI_VIRTIO=y (got n)" in msg and "SCSI=n" in msg
    assert "depends on DRM && VIRTIO_MENU && MMU" in msg and "DRM=n" in msg
    assert "drivers/" in msg  # the Kconfig file and line that declares it


def test_option_that_does_not_exist_is_named(kb, index):
    with pytest.raises(ImageError, match=r"CONFIG_VIRTIO_MMIOO=y \(got n\): no such option"):
        check_config(
            kb.config.read_text(), {"CONFIG_VIRTIO_MMIOO": "y"}, "f", tree=kb.source, index=index
        )


def test_selected_only_option_is_explained(index, kb):
    have = config_values(kb.config.read_text())
    why = kconfig.explain(index, "CONFIG_HAVE_LEGACY_CLK", "y", have)
    assert why.startswith("has no prompt: only another option's `select` can set it"), why
    assert "drivers/clk/Kconfig:" in why
    # one with selectors: each named, and the whole answer names the file
    have["CONFIG_DMA_RESTRICTED_POOL"] = "n"
    why = kconfig.explain(index, "CONFIG_SWIOTLB", "n", have)
    assert why.startswith("forced to y by `select` from ARM64"), why


def test_every_edgevirt_option_is_set_in_the_cached_config(kb, index):
    wanted = kmod.read_fragments(kmod.default_fragments())
    check_config(kb.config.read_text(), wanted, "edgevirt", tree=kb.source)  # no raise
    assert all(index.get(k) for k in wanted), "every fragment option exists in Kconfig"


# Regressions from the hardening issue: the own parser's gaps on Linux 6.1.
def test_kconfig_tab_separated_config_and_second_definitions_are_seen(index):
    # `config<TAB>AF_UNIX_OOB`: missed by the own parser (27 such symbols on 6.1)
    assert index.get("CONFIG_AF_UNIX_OOB") and index.get("CONFIG_IP_VS_IPV6")
    # a symbol defined twice keeps both definitions (the own parser dropped the second)
    twice = [s for s in index.kconf.unique_defined_syms if len(s.nodes) > 1]
    assert twice and all(len(index.get(s.name)) == len(s.nodes) for s in twice[:50])


def test_kconfig_trailing_comment_is_not_a_symbol(index):
    assert "TODO" not in index.kconf.syms or not index.kconf.syms["TODO"].nodes
    assert [d.symbol for d in index.get("HAVE_LEGACY_CLK")] == ["HAVE_LEGACY_CLK"]


def test_kconfig_blames_only_the_failing_part_of_a_dependency(index, kb):
    # ARM64_VA_BITS_52: `depends on ARM64_64K_PAGES && (ARM64_PAN || !ARM64_SW_TTBR0_PAN)`;
    # here ARM64_PAN=n but the parenthesis holds (SW_TTBR0_PAN=n): only 64K pages block it.
    have = config_values(kb.config.read_text())
    assert have.get("CONFIG_ARM64_PAN", "n") == "n"
    assert have.get("CONFIG_ARM64_SW_TTBR0_PAN", "n") == "n"
    why = kconfig.explain(index, "CONFIG_ARM64_VA_BITS_52", "y", have)
    blamed = why.split("`:", 1)[1]
    assert "ARM64_64K_PAGES=n" in blamed and "ARM64_PAN" not in blamed, why


def kconfig_value(index: kconfig.KconfigIndex, name: str) -> str:
    return str(index.kconf.syms[name].str_value or "n")


def test_kconfig_choice_select_and_range_are_reasoned_about(index, kb):
    have = config_values(kb.config.read_text())
    why = kconfig.explain(index, "CONFIG_CPU_BIG_ENDIAN", "y", have)
    assert why.startswith("it is in a choice where CPU_LITTLE_ENDIAN is selected"), why
    why = kconfig.explain(index, "CONFIG_ARM64_4K_PAGES", "n", have)
    assert "selected entry of its choice" in why
    why = kconfig.explain(index, "CONFIG_VIRTIO", "n", have)
    assert why.startswith("forced to y by `select` from ") and "VIRTIO_MMIO" in why
    why = kconfig.explain(index, "CONFIG_NR_CPUS", "5000", have)
    assert "range [2, 4096]" in why


def _parse_config(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"^CONFIG_(\w+)=(.*)$", line) or re.match(r"^# CONFIG_(\w+) is not set$", line)
        if m:
            out[m.group(1)] = m.group(2) if m.lastindex == 2 else "n"
    return out


def _conf(kb: kmod.KernelBuild, mode: str, config: Path) -> str:
    """The kernel's own ``conf`` on ``config`` (KCONFIG_CONFIG), run outside the tree."""
    env = {**os.environ, **kconfig.kconfig_env(kb.source), "KCONFIG_CONFIG": str(config)}
    r = subprocess.run(
        [str(kb.source / "scripts/kconfig/conf"), "-s", mode, str(kb.source / "Kconfig")],
        cwd=config.parent, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return config.read_text()


def test_kconfiglib_matches_conf_olddefconfig_on_every_arm64_symbol(kb, index, tmp_path):
    """Differential: allnoconfig + edgevirt's fragments + olddefconfig, by the kernel's own
    `conf` and by the wrapped kconfiglib, on the cached tree: every defined symbol agrees."""
    if not (kb.source / "scripts/kconfig/conf").exists():
        pytest.skip("the cached tree has no scripts/kconfig/conf")
    # toolchain probes ran through edgevirt's $(shell,...) (outside the tree and the cwd)
    assert index.kconf._functions["shell"][0] is kconfig._shell
    real_allno = _conf(kb, "--allnoconfig", tmp_path / "allno.config")
    ours_allno = kconfig.allnoconfig(index)
    assert _parse_config(ours_allno) == _parse_config(real_allno)
    merged = real_allno
    for f in kmod.default_fragments():  # as build_kernel appends them
        merged += f"\n# edgevirt fragment {f.name}\n" + f.read_text()
    (tmp_path / "merged.config").write_text(merged)
    real = _parse_config(_conf(kb, "--olddefconfig", tmp_path / "merged.config"))
    ours = _parse_config(kconfig.olddefconfig(index, merged))
    syms = index.kconf.unique_defined_syms
    assert len(syms) > 16000
    mismatches = {s.name: (real.get(s.name), ours.get(s.name)) for s in syms
                  if real.get(s.name) != ours.get(s.name)}  # fmt: skip
    assert mismatches == {}
    assert ours == real  # nothing written for an undefined symbol either
    # and the wrapper's view of the cached build's own .config agrees with the file
    index.load_config(kb.config.read_text())
    assert kconfig_value(index, "VIRTIO_MMIO") == "y"


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
