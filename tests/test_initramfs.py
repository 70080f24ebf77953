"""The .deb reader, the ELF/Image checks and the initramfs builder.

Oracles: ``dpkg-deb`` (builds the test packages, lists and extracts them), GNU ``cpio -i``
(unpacks the initramfs), and Debian's real ``busybox-static:arm64`` package.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
import struct
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgevirt.deploy.qemucmd import qemu_base
from edgevirt.errors import ImageError
from edgevirt.image import deb as debmod
from edgevirt.image.cpio import read_cpio
from edgevirt.image.deb import DebArchive, iter_deb, read_deb_file
from edgevirt.image.elfcheck import check_arm64_image_header, check_elf
from edgevirt.image.initramfs import (
    APPLETS,
    BUSYBOX_DEB_GLOB,
    build_initramfs,
    busybox_applets,
    download_busybox_deb,
    fetch_busybox,
)

IS_ROOT = os.geteuid() == 0
HOST_LS = Path("/bin/ls")
INIT = "#!/bin/sh\nmount -t proc proc /proc\necho edgevirt-ready\npoweroff -f\n"


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bb_cache() -> Path:
    """One download per machine: ``$EDGEVIRT_TEST_CACHE`` or <tmp>/edgevirt-test-cache."""
    base = os.environ.get("EDGEVIRT_TEST_CACHE")
    path = Path(base) if base else Path(tempfile.gettempdir()) / "edgevirt-test-cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def busybox_deb(bb_cache: Path) -> Path:
    try:
        return download_busybox_deb(bb_cache)
    except ImageError as e:
        pytest.skip(f"apt cannot download busybox-static:arm64 here: {e} ({e.hint})")


@pytest.fixture(scope="session")
def busybox(busybox_deb: Path, bb_cache: Path) -> Path:
    return fetch_busybox(bb_cache)


def _dpkg_deb_build(root: Path, out: Path, compress: str) -> Path:
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", f"-Z{compress}", "--build", str(root), str(out)],
        check=True,
        capture_output=True,
    )
    return out


def _pkg_tree(root: Path) -> None:
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(
        "Package: edgevirt-test\nVersion: 1.0-1\nArchitecture: all\n"
        "Maintainer: Test <t@example.org>\nDescription: tiny test package\n"
        " second line of the description\n"
    )
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/hello").write_bytes(b"#!/bin/sh\necho hello\n")
    (root / "usr/bin/hello").chmod(0o755)
    (root / "usr/share/doc/edgevirt-test").mkdir(parents=True)
    (root / "usr/share/doc/edgevirt-test/README").write_bytes(b"x" * 70000)
    (root / "usr/share/doc/edgevirt-test/README").chmod(0o644)
    (root / "usr/bin/hi").symlink_to("hello")
    os.link(root / "usr/bin/hello", root / "usr/bin/hello2")


@pytest.fixture(scope="module")
def pkg_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pkg") / "root"
    _pkg_tree(root)
    return root


@pytest.fixture(scope="module")
def tiny_deb(pkg_root: Path) -> Path:
    return _dpkg_deb_build(pkg_root, pkg_root.parent / "tiny_xz.deb", "xz")


# -- deb reader vs dpkg-deb ------------------------------------------------------------------


def _dpkg_listing(deb: Path) -> dict[str, str]:
    """path -> first letter of the mode column, from ``dpkg-deb -c``."""
    out = subprocess.run(
        ["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True
    ).stdout
    result = {}
    for line in out.splitlines():
        fields = line.split(None, 5)
        name = fields[5].split(" -> ")[0].split(" link to ")[0]
        result["/" + name.lstrip("./").rstrip("/") if name != "./" else "/"] = fields[0][0]
    return result


@pytest.mark.parametrize("compress", ["xz", "gzip", "zstd", "none"])
def test_deb_iter_matches_dpkg_deb(pkg_root: Path, compress: str) -> None:
    deb = _dpkg_deb_build(pkg_root, pkg_root.parent / f"tiny_{compress}.deb", compress)
    members = {m.path: m for m in iter_deb(deb)}
    listing = _dpkg_listing(deb)
    assert set(members) == set(listing)
    letter = {"file": "-", "dir": "d", "symlink": "l", "hardlink": "h"}
    for path, m in members.items():
        assert listing[path] == letter[m.type], path
    assert members["/usr/bin/hello"].data == b"#!/bin/sh\necho hello\n"
    assert members["/usr/bin/hello"].mode == 0o755
    assert members["/usr/bin/hi"].type == "symlink" and members["/usr/bin/hi"].linkname == "hello"
    assert read_deb_file(deb, "usr/share/doc/edgevirt-test/README") == b"x" * 70000


def test_deb_read_file_equals_dpkg_deb_extraction(tiny_deb: Path, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-x", str(tiny_deb), str(tmp_path)], check=True)
    d = DebArchive(tiny_deb)
    for rel in ("usr/bin/hello", "usr/share/doc/edgevirt-test/README"):
        for spelling in (rel, "/" + rel, "./" + rel):
            assert d.read_file(spelling) == (tmp_path / rel).read_bytes()


def test_deb_hardlink_resolves_to_its_target_data(tiny_deb: Path) -> None:
    d = DebArchive(tiny_deb)
    kinds = {m.path: m.type for m in d.iter_data()}
    link = "/usr/bin/hello2" if kinds["/usr/bin/hello2"] == "hardlink" else "/usr/bin/hello"
    assert kinds[link] == "hardlink"
    assert d.read_file(link) == b"#!/bin/sh\necho hello\n"


def test_deb_control_fields(tiny_deb: Path) -> None:
    c = DebArchive(tiny_deb).control()
    assert c["Package"] == "edgevirt-test" and c["Version"] == "1.0-1"
    assert c["Description"].endswith("second line of the description")


def test_deb_read_file_refuses_dirs_symlinks_and_missing(tiny_deb: Path) -> None:
    d = DebArchive(tiny_deb)
    with pytest.raises(ImageError, match="is a dir"):
        d.read_file("/usr/bin")
    with pytest.raises(ImageError, match="symlink -> hello"):
        d.read_file("/usr/bin/hi")
    with pytest.raises(ImageError, match="no /usr/bin/nope"):
        d.read_file("/usr/bin/nope")


# an ar writer for variants dpkg-deb will not produce (bz2, malformed)
def _ar(members: list[tuple[str, bytes]]) -> bytes:
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        out += (f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}").encode()
        out += b"`\n" + data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


def _tar(files: dict[str, bytes], mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:  # type: ignore[call-overload]
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


CONTROL = _tar({"./control": b"Package: p\nVersion: 1\n"}, "w:gz")


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_deb_reads_bz2_and_uncompressed_data(tmp_path: Path) -> None:
    for suffix, mode in ((".bz2", "w:bz2"), ("", "w"), (".gz", "w:gz")):
        deb = _write(
            tmp_path,
            f"p{suffix}.deb",
            _ar(
                [
                    ("debian-binary", b"2.0\n"),
                    ("control.tar.gz", CONTROL),
                    (f"data.tar{suffix}", _tar({"./bin/x": b"payload"}, mode)),
                ]
            ),
        )
        assert read_deb_file(deb, "/bin/x") == b"payload"
        assert DebArchive(deb).control()["Package"] == "p"


def _good_deb() -> bytes:
    return _ar(
        [
            ("debian-binary", b"2.0\n"),
            ("control.tar.gz", CONTROL),
            ("data.tar.gz", _tar({"./bin/x": b"payload" * 100}, "w:gz")),
        ]
    )


@pytest.mark.parametrize("name,data,offset", [
    ("bad_magic", b"!<arch>X" + _good_deb()[8:], 0),
    ("empty_file", b"", 0),
    ("truncated_header", _good_deb()[:8 + 30], 8),
    ("bad_fmag", _good_deb()[:8 + 58] + b"XX" + _good_deb()[8 + 60:], 8),
    ("bad_size", _good_deb()[:8 + 48] + b"12x4      " + _good_deb()[8 + 58:], 56),
    ("truncated_data", _good_deb()[:-300], None),
    ("not_debian_binary_first", _ar([("control.tar.gz", CONTROL)]), 8),
    ("no_data_tar", _ar([("debian-binary", b"2.0\n"), ("control.tar.gz", CONTROL)]), 8),
    ("wrong_version", _ar([("debian-binary", b"3.0\n"), ("control.tar.gz", CONTROL),
                           ("data.tar", b"")]), 68),
    ("unknown_compression", _ar([("debian-binary", b"2.0\n"), ("control.tar.gz", CONTROL),
                                 ("data.tar.lz4", b"")]), None),
])  # fmt: skip
def test_deb_malformed_names_file_and_offset(
    tmp_path: Path, name: str, data: bytes, offset: int | None
) -> None:
    deb = _write(tmp_path, f"{name}.deb", data)
    with pytest.raises(ImageError) as ei:
        DebArchive(deb)
    msg = str(ei.value)
    assert str(deb) in msg and "offset" in msg, msg
    if offset is not None:
        assert f"offset {offset}:" in msg, msg


def test_deb_corrupt_data_tar_names_file_and_member_offset(tmp_path: Path) -> None:
    data_tar = bytearray(_tar({"./bin/x": os.urandom(5000)}, "w:xz"))
    data_tar[100:140] = b"\xff" * 40
    deb = _write(
        tmp_path,
        "corrupt.deb",
        _ar(
            [
                ("debian-binary", b"2.0\n"),
                ("control.tar.gz", CONTROL),
                ("data.tar.xz", bytes(data_tar)),
            ]
        ),
    )
    d = DebArchive(deb)  # the ar layer is fine
    off = d.find_member("data.tar").offset
    with pytest.raises(ImageError, match=rf"{deb}: offset {off}: corrupt data.tar.xz"):
        list(d.iter_data())


def test_deb_missing_file_is_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot read"):
        DebArchive(tmp_path / "absent.deb")


def test_deb_zstd_without_any_decompressor_says_what_to_install(
    pkg_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deb = _dpkg_deb_build(pkg_root, pkg_root.parent / "tiny_zst2.deb", "zstd")

    def no_module(name: str) -> object:
        raise ImportError(name)

    monkeypatch.setattr(debmod.importlib, "import_module", no_module)
    monkeypatch.setattr(debmod.shutil, "which", lambda _name: None)
    with pytest.raises(ImageError, match="zstd") as ei:
        read_deb_file(deb, "/usr/bin/hello")
    assert ei.value.hint is not None and "zstandard" in ei.value.hint


# -- the real busybox-static:arm64 -----------------------------------------------------------


def test_busybox_deb_reader_matches_dpkg_deb(busybox_deb: Path, tmp_path: Path) -> None:
    d = DebArchive(busybox_deb)
    assert [m.name for m in d.members] == ["debian-binary", "control.tar.xz", "data.tar.xz"]
    ctl = d.control()
    assert ctl["Package"] == "busybox-static" and ctl["Architecture"] == "arm64"
    tar = subprocess.run(
        ["dpkg-deb", "--fsys-tarfile", str(busybox_deb)], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        fo = tf.extractfile("./bin/busybox")
        assert fo is not None
        assert d.read_file("/bin/busybox") == fo.read()
    assert set(m.path for m in d.iter_data()) == set(_dpkg_listing(busybox_deb))


def test_fetch_busybox_is_cached_static_aarch64(busybox: Path, bb_cache: Path) -> None:
    assert busybox.parent == bb_cache
    assert stat.S_IMODE(busybox.stat().st_mode) == 0o755
    mtime = busybox.stat().st_mtime_ns
    assert fetch_busybox(bb_cache) == busybox  # second call: cache hit, nothing rewritten
    assert busybox.stat().st_mtime_ns == mtime
    assert len(list(bb_cache.glob(BUSYBOX_DEB_GLOB))) == 1


def test_fetch_busybox_apt_failure_tells_how_to_enable_arm64(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    apt = fake_bin / "apt-get"
    apt.write_text(
        "#!/bin/sh\necho 'E: Unable to locate package busybox-static:arm64' >&2\nexit 100\n"
    )
    apt.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    with pytest.raises(ImageError, match="Unable to locate package") as ei:
        fetch_busybox(tmp_path / "cache")
    assert ei.value.hint is not None
    assert "dpkg --add-architecture arm64 && apt-get update" in ei.value.hint
    assert not list((tmp_path / "cache").iterdir())  # no half download left behind


def test_busybox_has_every_applet_we_link(busybox: Path) -> None:
    known = busybox_applets(busybox.read_bytes())
    assert known is not None and "sh" in known and len(known) > 200
    assert [a for a in APPLETS if a not in known] == []
    assert busybox_applets(b"\0" * 100) is None


# -- elfcheck --------------------------------------------------------------------------------


def test_elf_busybox_is_aarch64_static(busybox: Path) -> None:
    info = check_elf(busybox, require_static=True)
    assert (info.machine, info.elfclass, info.little_endian) == ("EM_AARCH64", 64, True)
    assert info.static and info.interpreter is None
    assert "AArch64" in info.describe()
    with pytest.raises(ImageError, match="statically linked"):
        check_elf(busybox, static_ok=False)


def test_elf_host_ls_is_wrong_machine_named_in_the_error() -> None:
    with pytest.raises(ImageError) as ei:
        check_elf(HOST_LS)
    msg = str(ei.value)
    assert str(HOST_LS) in msg and "EM_X86_64" in msg and "expected EM_AARCH64" in msg


def test_elf_host_ls_is_dynamic() -> None:
    info = check_elf(HOST_LS, machine="EM_X86_64")
    assert not info.static and info.interpreter and "ld-linux" in info.interpreter
    with pytest.raises(ImageError, match="dynamically linked"):
        check_elf(HOST_LS, machine=None, require_static=True)


def test_elf_not_elf_and_truncated_are_image_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not an ELF file"):
        check_elf(b"#!/bin/sh\n", name="script")
    with pytest.raises(ImageError, match=r"cut\.elf: malformed ELF"):
        check_elf(HOST_LS.read_bytes()[:40], name="cut.elf", machine=None)
    with pytest.raises(ImageError, match="cannot read"):
        check_elf(tmp_path / "absent")


def _arm64_header(
    text_offset: int = 0, image_size: int = 0x200000, flags: int = 0xA, magic: int = 0x644D5241
) -> bytes:
    return struct.pack(
        "<IIQQQQQQII", 0x91005A4D, 0x14000000, text_offset, image_size, flags, 0, 0, 0, magic, 0x40
    )


def test_arm64_image_header_fields(tmp_path: Path) -> None:
    img = _write(tmp_path, "Image", _arm64_header() + b"\0" * 4096)
    h = check_arm64_image_header(img)
    assert (h.text_offset, h.image_size, h.page_size, h.efi_stub) == (0, 0x200000, 4096, True)
    assert not h.big_endian
    legacy = check_arm64_image_header(_arm64_header(image_size=0) + b"\0" * 64)
    assert legacy.text_offset == 0x80000


@pytest.mark.parametrize("data,match", [
    (_arm64_header(magic=0x12345678), "no arm64 Image magic at offset 0x38"),
    (b"\0" * 20, "too short"),
    (gzip.compress(b"x" * 100), "gzip-compressed"),
    (b"\x7fELF" + b"\0" * 100, "ELF file"),
    (_arm64_header(image_size=0x10) + b"\0" * 64, "image_size 0x10 is smaller"),
    (_arm64_header(flags=1), "big-endian"),
])  # fmt: skip
def test_arm64_image_header_rejects(data: bytes, match: str) -> None:
    with pytest.raises(ImageError, match=match):
        check_arm64_image_header(data)


def _built_kernel_images() -> Iterator[Path]:
    base = Path(os.environ.get("EDGEVIRT_CACHE") or Path.home() / ".cache/edgevirt")
    yield from sorted(base.glob("kernel/*/Image"))


def test_arm64_image_header_on_a_built_kernel() -> None:
    images = list(_built_kernel_images())
    if not images:
        pytest.skip("no kernel built yet in the edgevirt cache (kernel/*/Image)")
    h = check_arm64_image_header(images[0])
    assert h.image_size >= h.file_size and h.page_size == 4096


# -- build_initramfs -------------------------------------------------------------------------


def _extract(archive: Path, dest: Path) -> Path:
    dest.mkdir()
    subprocess.run(
        ["cpio", "-i", "-d", "-m", "--quiet", "--no-absolute-filenames"],
        input=gzip.decompress(archive.read_bytes()),
        cwd=dest,
        check=True,
    )
    return dest


def test_initramfs_layout_seen_by_cpio_i(busybox: Path, tmp_path: Path) -> None:
    extra_host = _write(tmp_path, "agent.sh", b"#!/bin/sh\necho agent\n")
    extra_host.chmod(0o750)
    overlay = tmp_path / "overlay"
    (overlay / "etc").mkdir(parents=True)
    (overlay / "etc/motd").write_text("hi\n")
    out = tmp_path / "initramfs.cpio.gz"
    info = build_initramfs(
        out,
        busybox=busybox,
        init_script=INIT,
        overlay_dir=overlay,
        extra_files={
            "/usr/lib/edgevirt/agent": extra_host,
            "/etc/board": b"qemu-virt\n",
            "/opt/run": (b"#!/bin/sh\n", 0o700),
        },
    )
    assert info.size == out.stat().st_size and info.applets == APPLETS
    root = _extract(out, tmp_path / "x")
    assert (root / "bin/busybox").read_bytes() == busybox.read_bytes()
    assert stat.S_IMODE((root / "bin/busybox").stat().st_mode) == 0o755
    for applet in ("sh", "mount", "cat", "dd", "sha256sum", "poweroff", "[", "cttyhack"):
        assert os.readlink(root / "bin" / applet) == "busybox", applet
    assert os.readlink(root / "sbin") == "bin"
    assert os.readlink(root / "usr/bin") == "../bin"
    assert (root / "init").read_text() == INIT
    assert stat.S_IMODE((root / "init").stat().st_mode) == 0o755
    for d, mode in (
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("tmp", 0o1777),
        ("root", 0o700),
    ):
        assert stat.S_IMODE((root / d).stat().st_mode) == mode, d
    assert (root / "usr/lib/edgevirt/agent").read_bytes() == extra_host.read_bytes()
    assert stat.S_IMODE((root / "usr/lib/edgevirt/agent").stat().st_mode) == 0o750
    assert (root / "etc/board").read_bytes() == b"qemu-virt\n"
    assert stat.S_IMODE((root / "opt/run").stat().st_mode) == 0o700
    assert (root / "etc/motd").read_text() == "hi\n"
    if IS_ROOT:
        for dev, major, minor in (("console", 5, 1), ("null", 1, 3)):
            s = os.lstat(root / "dev" / dev)
            assert stat.S_ISCHR(s.st_mode)
            assert (os.major(s.st_rdev), os.minor(s.st_rdev)) == (major, minor)


def test_initramfs_device_nodes_in_headers(busybox: Path, tmp_path: Path) -> None:
    out = tmp_path / "i.gz"
    build_initramfs(out, busybox=busybox, init_script=INIT)
    recs = {r.name: r for r in read_cpio(out.read_bytes())}
    assert stat.S_ISCHR(recs["dev/console"].mode)
    assert (recs["dev/console"].rdevmajor, recs["dev/console"].rdevminor) == (5, 1)
    assert (recs["dev/null"].rdevmajor, recs["dev/null"].rdevminor) == (1, 3)
    assert {r.uid for r in recs.values()} == {0} and {r.mtime for r in recs.values()} == {0}


def test_initramfs_rebuild_is_byte_identical(busybox: Path, tmp_path: Path) -> None:
    init_file = _write(tmp_path, "init", INIT.encode())
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    build_initramfs(a, busybox=busybox, init_script=INIT, extra_files={"/etc/x": b"1"})
    build_initramfs(b, busybox=busybox, init_script=init_file, extra_files={"/etc/x": b"1"})
    assert a.read_bytes() == b.read_bytes()
    build_initramfs(
        c, busybox=busybox, init_script=INIT, extra_files={"/etc/x": b"1"}, mtime=1_700_000_000
    )
    assert a.read_bytes() != c.read_bytes()


def test_initramfs_refuses_a_host_busybox(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="EM_X86_64.*expected EM_AARCH64"):
        build_initramfs(tmp_path / "o", busybox=HOST_LS, init_script=INIT)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("init,match", [
    ("echo no shebang\n", "must start with '#!'"),
    ("#!/bin/bash\necho\n", "/bin/bash is not a file in the initramfs"),
    ("#!sh\n", "not absolute"),
    ("#!/bin\n", "not a file"),
])  # fmt: skip
def test_initramfs_init_rule(busybox: Path, tmp_path: Path, init: str, match: str) -> None:
    with pytest.raises(ImageError, match=match):
        build_initramfs(tmp_path / "o", busybox=busybox, init_script=init)


def test_initramfs_init_via_symlinked_sbin_is_accepted(busybox: Path, tmp_path: Path) -> None:
    build_initramfs(tmp_path / "o", busybox=busybox, init_script="#!/sbin/sh\n")
    build_initramfs(tmp_path / "o", busybox=busybox, init_script="#!/usr/bin/env sh\n")


@pytest.mark.parametrize("extra,match", [
    ({"etc/relative": b"x"}, "must be absolute"),
    ({"/init": b"other"}, "added twice"),
    ({"/bin/sh": b"not busybox"}, "added twice"),
    ({"/usr/bin/tool": b"x"}, "parent 'usr/bin'.*symlink"),
    ({"/etc/../escape": b"x"}, "'..'"),
    ({"/etc/x": "text"}, "expected bytes, Path"),
])  # fmt: skip
def test_initramfs_extra_files_rule(
    busybox: Path, tmp_path: Path, extra: dict[str, object], match: str
) -> None:
    with pytest.raises(ImageError, match=match):
        build_initramfs(tmp_path / "o", busybox=busybox, init_script=INIT, extra_files=extra)  # type: ignore[arg-type]


def test_initramfs_unknown_applets_are_skipped(busybox: Path, tmp_path: Path) -> None:
    info = build_initramfs(
        tmp_path / "o", busybox=busybox, init_script=INIT, applets=["sh", "no-such-applet"]
    )
    assert info.applets == ("sh",)


def test_busybox_deb_glob_matches_apt_file_names() -> None:
    assert Path("busybox-static_1%3a1.35.0-4+deb12u1+b1_arm64.deb").match(BUSYBOX_DEB_GLOB)


@pytest.mark.e2e
def test_e2e_kernel_unpacks_and_runs_the_initramfs(busybox: Path, tmp_path: Path) -> None:
    """The real oracle: the guest kernel unpacks the archive and runs /init on busybox."""
    images = list(_built_kernel_images())
    qemu = shutil.which("qemu-system-aarch64")
    if not images or qemu is None:
        pytest.skip("needs a built kernel (kernel/*/Image in the cache) and qemu-system-aarch64")
    init = (
        "#!/bin/sh\nmount -t proc proc /proc\n"
        'echo "MARK $(uname -m) $(cat /etc/board)"\n'
        "[ -c /dev/console ] && [ -c /dev/null ] && echo DEVNODES-OK\n"
        "echo abc | sha256sum\npoweroff -f\n"
    )
    out = tmp_path / "initramfs.cpio.gz"
    build_initramfs(out, busybox=busybox, init_script=init, extra_files={"/etc/board": b"virt"})
    proc = subprocess.run(
        qemu_base("virt", binary=qemu, cpu="cortex-a57", memory="256M", extra=[
            "-no-reboot", "-kernel", str(images[0]), "-initrd", str(out),
            "-append", "console=ttyAMA0 panic=-1"]),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    log = proc.stdout
    assert "MARK aarch64 virt" in log, log[-2000:]
    assert "DEVNODES-OK" in log
    assert "edeaaff3f1774ad2888673770c6d64097e391bc362d7d6fb34982ddf0efd18cb" in log
    assert "Power down" in log
