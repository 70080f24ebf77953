"""Out-of-tree modules built against the cached kernel tree, checked with pyelftools."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from edgevirt.errors import ImageError
from edgevirt.image import modules as modmod
from edgevirt.image.kernel import build_kernel
from edgevirt.image.verify import verify_module

HELLO = r"""
// SPDX-License-Identifier: GPL-2.0
#include <linux/module.h>
static int answer = 42;
module_param(answer, int, 0444);
static int __init t_init(void) { pr_info("ev_test answer=%d\n", answer); return 0; }
static void __exit t_exit(void) { }
module_init(t_init);
module_exit(t_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("edgevirt module-builder test");
"""


@pytest.fixture(scope="module")
def kb():
    return build_kernel()


def module_dir(root: Path, name: str, body: str) -> Path:
    d = root / name
    d.mkdir()
    (d / "Kbuild").write_text(f"obj-m := {name}.o\n")
    # A per-test comment gives each run its own cache entry (concurrent runs never share one).
    (d / f"{name}.c").write_text(f"// {root}\n" + body)
    return d


def drop_cache_entry(built):
    for m in built:
        shutil.rmtree(m.ko.parent.parent, ignore_errors=True)


def test_edgevirt_dma_module_builds_for_this_kernel(kb):
    dirs = modmod.discover()
    assert "edgevirt_dma" in [d.name for d in dirs]
    built = modmod.build_modules(kb, [d for d in dirs if d.name == "edgevirt_dma"])
    (m,) = built
    assert m.info.release == kb.release
    assert m.info.license == "GPL" and "DMA" in m.info.description
    # Oracle: binutils' view of the same object.
    hdr = subprocess.run(["readelf", "-h", str(m.ko)], capture_output=True, text=True).stdout
    assert "AArch64" in hdr and "REL (Relocatable file)" in hdr


def test_every_dir_with_a_kbuild_is_a_module(tmp_path, kb):
    d = module_dir(tmp_path, "ev_test", HELLO)
    (tmp_path / "not_a_module").mkdir()
    dirs = modmod.discover([d])
    assert dirs[-1] == d
    built = modmod.build_modules(kb, [d])
    try:
        assert [m.ko.name for m in built] == ["ev_test.ko"]
        assert built[0].info.vermagic.startswith(kb.release + " ")
        # A second call hits the cache: same file, no rebuild.
        again = modmod.build_modules(kb, [d])
        assert again[0].ko == built[0].ko
    finally:
        drop_cache_entry(built)


def test_undefined_symbol_fails_naming_the_module(tmp_path, kb):
    body = HELLO.replace("return 0;", "return ev_no_such_function();").replace(
        "static int answer", "int ev_no_such_function(void);\nstatic int answer"
    )
    d = module_dir(tmp_path, "ev_broken", body)
    with pytest.raises(ImageError) as ei:
        modmod.build_modules(kb, [d])
    assert "module ev_broken" in str(ei.value) and "ev_no_such_function" in str(ei.value)
    assert not list((modmod.cache_dir() / "modules").glob("*/ev_broken"))


def test_compile_error_is_reported_with_the_compiler_line(tmp_path, kb):
    d = module_dir(tmp_path, "ev_syntax", HELLO + "\nthis is not C;\n")
    with pytest.raises(ImageError, match=r"module ev_syntax .*error"):
        modmod.build_modules(kb, [d])


def test_module_for_another_kernel_is_refused(kb, tmp_path):
    (m,) = modmod.build_modules(kb, [d for d in modmod.discover() if d.name == "edgevirt_dma"])
    data = m.ko.read_bytes()
    other = data.replace(f"vermagic={kb.release} ".encode(), b"vermagic=5.10.99 ")
    assert other != data
    with pytest.raises(ImageError, match=r"built for kernel 5\.10\.99 .* kernel is " + kb.release):
        verify_module(other, release=kb.release, name="other.ko")


def test_host_object_is_not_a_guest_module(tmp_path):
    src = tmp_path / "x.c"
    src.write_text("int x;\n")
    obj = tmp_path / "x.o"
    subprocess.run(["gcc", "-c", str(src), "-o", str(obj)], check=True)
    with pytest.raises(ImageError, match="wrong architecture EM_X86_64"):
        verify_module(obj)


def test_bad_module_dirs(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(ImageError, match="no Kbuild or Makefile"):
        modmod.discover([plain])
    with pytest.raises(ImageError, match="not a directory"):
        modmod.discover([tmp_path / "absent"])
