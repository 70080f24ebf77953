"""The newc writer, checked against GNU cpio (``cpio -t`` / ``cpio -i``) as the oracle."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgevirt.errors import ImageError
from edgevirt.image.cpio import CpioWriter, gzip_deterministic, read_cpio

pytestmark = pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")

IS_ROOT = os.geteuid() == 0


# -- oracles ---------------------------------------------------------------------------------


def cpio_list(archive: bytes) -> list[str]:
    out = subprocess.run(["cpio", "-t", "--quiet"], input=archive, capture_output=True, check=True)
    return out.stdout.decode().splitlines()


def cpio_extract(archive: bytes, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["cpio", "-i", "-d", "-m", "--quiet", "--no-absolute-filenames"],
        input=archive,
        cwd=dest,
        capture_output=True,
        check=True,
    )


def parse_newc(data: bytes) -> list[dict[str, object]]:
    """An independent newc parser (not edgevirt's) for the header fields cpio hides."""
    names = (
        "ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check"
    ).split()
    out: list[dict[str, object]] = []
    off = 0
    while True:
        assert off % 4 == 0, f"header at unaligned offset {off}"
        assert data[off : off + 6] == b"070701"
        rec: dict[str, object] = {
            n: int(data[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i, n in enumerate(names)
        }
        nsz = rec["namesize"]
        assert isinstance(nsz, int)
        name = data[off + 110 : off + 110 + nsz - 1].decode()
        assert data[off + 110 + nsz - 1] == 0
        doff = off + 110 + nsz
        doff += -doff % 4
        fsz = rec["filesize"]
        assert isinstance(fsz, int)
        rec["name"], rec["data"], rec["offset"] = name, data[doff : doff + fsz], off
        # padding bytes are zero
        end = doff + fsz
        assert data[end : end + (-end % 4)] == b"\0" * (-end % 4)
        if name == "TRAILER!!!":
            assert end + (-end % 4) == len(data), "bytes after the trailer"
            return out
        out.append(rec)
        off = end + (-end % 4)


def sample_writer(mtime: int = 0) -> CpioWriter:
    w = CpioWriter(mtime=mtime)
    w.add_file("bin/tool", b"#!/bin/sh\necho tool\n", 0o755)
    w.add_file("etc/empty", b"", 0o644)
    for n in range(1, 6):  # every padding remainder
        w.add_file(f"pad/f{n}", b"x" * n, 0o640)
    w.add_file("deep/a/b/c/file", b"nested", 0o600)
    w.add_dir("private", 0o700)
    w.add_dir("tmp", 0o1777)
    w.add_file("private/secret", b"s3cret\n", 0o400)
    w.add_file("suid", b"\x7fELF-not-really", 0o4755)
    w.add_symlink("bin/sh", "tool")
    w.add_symlink("abs-link", "/etc/empty")
    w.add_symlink("dangling", "no/such/thing")
    w.add_device("dev/console", "c", 5, 1, 0o600)
    w.add_device("dev/null", "c", 1, 3, 0o666)
    w.add_device("dev/vda", "b", 254, 0, 0o660)
    w.add_device("dev/big", "c", 4095, (1 << 20) - 1, 0o600)
    w.add_file("ünïcode/名前", "text ✓".encode(), 0o644)
    return w


# -- cpio -t / cpio -i -----------------------------------------------------------------------


def test_cpio_t_lists_every_entry_in_sorted_order() -> None:
    w = sample_writer()
    listed = cpio_list(w.to_bytes(None))
    assert listed == [e.path for e in w.entries()]
    assert listed[:3] == ["abs-link", "bin", "bin/sh"]
    # implied parents precede their children
    assert listed.index("deep") < listed.index("deep/a") < listed.index("deep/a/b/c/file")


def test_cpio_i_extracts_files_dirs_symlinks_with_modes(tmp_path: Path) -> None:
    w = sample_writer(mtime=1_700_000_000)
    cpio_extract(w.to_bytes(None), tmp_path)
    assert (tmp_path / "bin/tool").read_bytes() == b"#!/bin/sh\necho tool\n"
    assert stat.S_IMODE((tmp_path / "bin/tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "tmp").stat().st_mode) == 0o1777
    assert stat.S_IMODE((tmp_path / "private/secret").stat().st_mode) == 0o400
    assert stat.S_IMODE((tmp_path / "deep/a").stat().st_mode) == 0o755  # implied
    assert (tmp_path / "etc/empty").read_bytes() == b""
    for n in range(1, 6):
        assert (tmp_path / f"pad/f{n}").read_bytes() == b"x" * n
    assert (tmp_path / "deep/a/b/c/file").read_bytes() == b"nested"
    assert os.readlink(tmp_path / "bin/sh") == "tool"
    assert os.readlink(tmp_path / "abs-link") == "/etc/empty"
    assert os.readlink(tmp_path / "dangling") == "no/such/thing"
    assert (tmp_path / "ünïcode/名前").read_text() == "text ✓"
    assert (tmp_path / "bin/tool").stat().st_mtime == 1_700_000_000
    if IS_ROOT:
        assert stat.S_IMODE((tmp_path / "suid").stat().st_mode) == 0o4755


@pytest.mark.skipif(not IS_ROOT, reason="creating device nodes with cpio -i needs root")
def test_cpio_i_creates_device_nodes_with_major_minor(tmp_path: Path) -> None:
    cpio_extract(sample_writer().to_bytes(None), tmp_path)
    expect = {
        "console": ("c", 5, 1, 0o600),
        "null": ("c", 1, 3, 0o666),
        "vda": ("b", 254, 0, 0o660),
        "big": ("c", 4095, (1 << 20) - 1, 0o600),
    }
    for name, (kind, major, minor, mode) in expect.items():
        s = os.lstat(tmp_path / "dev" / name)
        assert stat.S_ISCHR(s.st_mode) if kind == "c" else stat.S_ISBLK(s.st_mode), name
        assert (os.major(s.st_rdev), os.minor(s.st_rdev)) == (major, minor)
        assert stat.S_IMODE(s.st_mode) == mode


def test_cpio_tv_shows_device_numbers_without_root() -> None:
    out = subprocess.run(
        ["cpio", "-tv", "--quiet"],
        input=sample_writer().to_bytes(None),
        capture_output=True,
        check=True,
    ).stdout.decode()
    console = next(line for line in out.splitlines() if line.endswith("dev/console"))
    assert console.startswith("crw-------")
    assert "5,       1" in console or "5, 1" in " ".join(console.split())
    vda = next(line for line in out.splitlines() if line.endswith("dev/vda"))
    assert vda.startswith("brw-rw----")


def test_headers_are_deterministic_fields() -> None:
    w = sample_writer(mtime=12345)
    recs = parse_newc(w.to_bytes(None))
    assert [r["name"] for r in recs] == [e.path for e in w.entries()]
    assert [r["ino"] for r in recs] == list(range(1, len(recs) + 1))
    for r in recs:
        assert r["uid"] == 0 and r["gid"] == 0 and r["check"] == 0
        assert r["devmajor"] == 0 and r["devminor"] == 0
        assert r["mtime"] == 12345


def test_directory_nlink_counts_subdirectories() -> None:
    w = CpioWriter()
    w.add_file("a/x/f", b"1")
    w.add_file("a/y/f", b"2")
    w.add_dir("a/z")
    w.add_file("a/plain", b"3")
    w.add_symlink("a/link", "x")
    nlink = {r["name"]: r["nlink"] for r in parse_newc(w.to_bytes(None))}
    assert nlink["a"] == 2 + 3
    assert nlink["a/x"] == 2 and nlink["a/z"] == 2
    assert nlink["a/plain"] == 1 and nlink["a/link"] == 1 and nlink["a/x/f"] == 1


def test_read_cpio_round_trips_what_cpio_sees() -> None:
    w = sample_writer()
    for archive in (w.to_bytes(None), w.to_bytes("gzip")):
        recs = read_cpio(archive)
        assert [r.name for r in recs] == cpio_list(w.to_bytes(None))
        by = {r.name: r for r in recs}
        assert by["bin/sh"].data == b"tool"
        assert (by["dev/vda"].rdevmajor, by["dev/vda"].rdevminor) == (254, 0)
        assert stat.S_ISBLK(by["dev/vda"].mode)


def test_read_cpio_rejects_garbage() -> None:
    good = sample_writer().to_bytes(None)
    with pytest.raises(ImageError, match="bad magic"):
        read_cpio(b"070702" + good[6:])
    with pytest.raises(ImageError, match="offset"):
        read_cpio(good[:-200])


# -- gzip and reproducibility ----------------------------------------------------------------


def test_gzip_output_decompresses_to_the_raw_archive_with_a_fixed_header() -> None:
    w = sample_writer()
    raw, gz = w.to_bytes(None), w.to_bytes()
    assert gz[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"  # no mtime, no file name
    assert gzip.decompress(gz) == raw
    # the system's gzip agrees (integrity and content)
    subprocess.run(["gzip", "-t"], input=gz, check=True)
    assert subprocess.run(["gzip", "-dc"], input=gz, capture_output=True, check=True).stdout == raw
    assert cpio_list(gzip.decompress(gz)) == cpio_list(raw)


def test_write_streams_the_same_bytes_as_to_bytes(tmp_path: Path) -> None:
    w = sample_writer()
    for compress in (None, "gzip"):
        buf = io.BytesIO()
        n = w.write(buf, compress=compress)  # type: ignore[arg-type]
        assert buf.getvalue() == w.to_bytes(compress)  # type: ignore[arg-type]
        assert n == len(buf.getvalue())
    out = tmp_path / "x.cpio.gz"
    assert w.write_to(out) == out.stat().st_size
    assert out.read_bytes() == w.to_bytes("gzip")
    assert gzip_deterministic(b"abc") == gzip_deterministic(b"abc")


def test_repeated_builds_are_byte_identical_whatever_the_insertion_order() -> None:
    a = sample_writer()
    b = CpioWriter()
    for e in reversed(a.entries()):  # same entries, opposite order
        if e.implied:
            continue
        if e.kind == "file":
            b.add_file(e.path, e.data, stat.S_IMODE(e.mode))
        elif e.kind == "dir":
            b.add_dir(e.path, stat.S_IMODE(e.mode))
        elif e.kind == "symlink":
            b.add_symlink(e.path, e.data.decode())
        else:
            b.add_device(
                e.path,
                "c" if e.kind == "char" else "b",
                e.rdevmajor,
                e.rdevminor,
                stat.S_IMODE(e.mode),
            )
    assert a.to_bytes("gzip") == b.to_bytes("gzip") == sample_writer().to_bytes("gzip")


def test_source_date_epoch_sets_mtime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1600000000")
    w = CpioWriter()
    w.add_file("f", b"x")
    assert {r["mtime"] for r in parse_newc(w.to_bytes(None))} == {1600000000}
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    w2 = CpioWriter()
    w2.add_file("f", b"x")
    assert {r["mtime"] for r in parse_newc(w2.to_bytes(None))} == {0}
    assert w.to_bytes(None) != w2.to_bytes(None)


def test_source_date_epoch_not_a_number_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(ImageError, match="SOURCE_DATE_EPOCH"):
        CpioWriter()


# -- add_tree --------------------------------------------------------------------------------


def make_tree(root: Path) -> None:
    (root / "etc/init.d").mkdir(parents=True)
    (root / "etc/init.d/rcS").write_text("#!/bin/sh\n")
    (root / "etc/init.d/rcS").chmod(0o755)
    (root / "etc/hostname").write_text("guest\n")
    (root / "etc/hostname").chmod(0o644)
    (root / "empty-dir").mkdir()
    (root / "empty-dir").chmod(0o750)
    (root / "link").symlink_to("etc/hostname")


def test_add_tree_matches_the_host_tree_after_cpio_i(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    w = CpioWriter()
    assert w.add_tree(src, "overlay") == 6
    assert cpio_list(w.to_bytes(None)) == [
        "overlay",
        "overlay/empty-dir",
        "overlay/etc",
        "overlay/etc/hostname",
        "overlay/etc/init.d",
        "overlay/etc/init.d/rcS",
        "overlay/link",
    ]
    out = tmp_path / "out"
    cpio_extract(w.to_bytes(None), out)
    assert (out / "overlay/etc/init.d/rcS").read_text() == "#!/bin/sh\n"
    assert stat.S_IMODE((out / "overlay/etc/init.d/rcS").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "overlay/empty-dir").stat().st_mode) == 0o750
    assert os.readlink(out / "overlay/link") == "etc/hostname"


def test_add_tree_is_reproducible_across_copies_and_times(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    make_tree(a)
    make_tree(b)
    os.utime(b / "etc/hostname", (1, 1))
    wa, wb = CpioWriter(), CpioWriter()
    wa.add_tree(a)
    wb.add_tree(b)
    assert wa.to_bytes("gzip") == wb.to_bytes("gzip")


def test_add_tree_merges_directories_already_present(tmp_path: Path) -> None:
    make_tree(tmp_path)
    (tmp_path / "etc").chmod(0o775)
    w = CpioWriter()
    w.add_dir("etc", 0o755)
    w.add_tree(tmp_path)
    assert stat.S_IMODE(w.get("etc").mode) == 0o755  # type: ignore[union-attr]


@pytest.mark.skipif(not IS_ROOT, reason="mknod needs root")
def test_add_tree_keeps_host_device_nodes(tmp_path: Path) -> None:
    os.mknod(tmp_path / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    w = CpioWriter()
    w.add_tree(tmp_path)
    e = w.get("null")
    assert e is not None and e.kind == "char" and (e.rdevmajor, e.rdevminor) == (1, 3)


def test_add_tree_refuses_fifos(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ImageError, match="fifo"):
        CpioWriter().add_tree(tmp_path)


def test_add_tree_refuses_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not a directory"):
        CpioWriter().add_tree(tmp_path / "nope")


# -- negative: path rules --------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    "/etc/passwd", "../escape", "a/../b", "a/./b", "./a", ".", "..", "", "a//b", "/",
    "nul\0byte",
])  # fmt: skip
def test_path_rule_relative_normalized_only(bad: str) -> None:
    w = CpioWriter()
    with pytest.raises(ImageError):
        w.add_file(bad, b"x")
    with pytest.raises(ImageError):
        w.add_dir(bad)
    assert len(w) == 0


def test_path_rule_name_longer_than_path_max() -> None:
    long = "/".join(["d" * 200] * 21)  # 4220 bytes
    with pytest.raises(ImageError, match="limit 4095"):
        CpioWriter().add_file(long, b"x")


def test_path_rule_component_longer_than_name_max() -> None:
    with pytest.raises(ImageError, match="limit 255"):
        CpioWriter().add_file("d/" + "n" * 256, b"x")
    CpioWriter().add_file("d/" + "n" * 255, b"x")  # the limit itself is fine


def test_duplicate_rule_same_content_is_a_no_op() -> None:
    w = CpioWriter()
    w.add_file("a", b"x", 0o644)
    w.add_file("a", b"x", 0o644)
    assert len(w) == 1


@pytest.mark.parametrize("second", [
    lambda w: w.add_file("etc/f", b"other", 0o644),
    lambda w: w.add_file("etc/f", b"same", 0o600),
    lambda w: w.add_dir("etc/f"),
    lambda w: w.add_symlink("etc/f", "x"),
    lambda w: w.add_device("etc/f", "c", 1, 3),
])  # fmt: skip
def test_duplicate_rule_different_content_is_refused(second) -> None:  # type: ignore[no-untyped-def]
    w = CpioWriter()
    w.add_file("etc/f", b"same", 0o644)
    with pytest.raises(ImageError, match="added twice"):
        second(w)


def test_duplicate_rule_explicit_dirs_with_different_modes() -> None:
    w = CpioWriter()
    w.add_file("d/f", b"")  # implies d (0755)
    w.add_dir("d", 0o700)  # explicit replaces implied
    assert stat.S_IMODE(w.get("d").mode) == 0o700  # type: ignore[union-attr]
    w.add_dir("d", 0o700)
    with pytest.raises(ImageError, match="added twice"):
        w.add_dir("d", 0o755)


def test_parent_rule_file_cannot_be_a_parent() -> None:
    w = CpioWriter()
    w.add_file("a", b"x")
    with pytest.raises(ImageError, match="parent 'a'.*file"):
        w.add_file("a/b", b"y")
    w.add_symlink("l", "a")
    with pytest.raises(ImageError, match="symlink"):
        w.add_file("l/b", b"y")


def test_implied_dir_cannot_become_a_file() -> None:
    w = CpioWriter()
    w.add_file("a/b", b"x")
    with pytest.raises(ImageError, match="added twice"):
        w.add_file("a", b"y")


@pytest.mark.parametrize("mode", [-1, 0o10000, stat.S_IFREG | 0o644, 420.0])
def test_mode_rule_permission_bits_only(mode) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ImageError, match="mode"):
        CpioWriter().add_file("f", b"x", mode)


@pytest.mark.parametrize("kind,major,minor", [
    ("x", 1, 3), ("c", -1, 0), ("c", 4096, 0), ("b", 0, 1 << 20), ("c", 1.0, 3),
])  # fmt: skip
def test_device_rule_kind_and_numbers(kind, major, minor) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ImageError, match="device"):
        CpioWriter().add_device("dev/x", kind, major, minor)


@pytest.mark.parametrize("target", ["", "a\0b"])
def test_symlink_rule_target_nonempty_without_nul(target: str) -> None:
    with pytest.raises(ImageError, match="symlink target"):
        CpioWriter().add_symlink("l", target)


def test_data_rule_must_be_bytes() -> None:
    with pytest.raises(ImageError, match="bytes"):
        CpioWriter().add_file("f", "text")  # type: ignore[arg-type]


def test_compress_rule_gzip_or_none() -> None:
    with pytest.raises(ImageError, match="compression"):
        CpioWriter().write(io.BytesIO(), compress="xz")  # type: ignore[arg-type]


def test_mtime_rule_fits_32_bits() -> None:
    with pytest.raises(ImageError, match="mtime"):
        CpioWriter(mtime=1 << 32)


# -- property: any tree survives a round trip through GNU cpio -------------------------------

_name = st.text(alphabet="abcdefgh_-.0123456789", min_size=1, max_size=8).filter(
    lambda s: s not in (".", "..")
)
_tree = st.dictionaries(
    st.lists(_name, min_size=1, max_size=4).map("/".join),
    st.tuples(st.binary(max_size=300), st.sampled_from([0o644, 0o755, 0o600, 0o444])),
    max_size=12,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tree=_tree)
def test_property_any_file_set_round_trips_through_cpio_i(
    tree: dict[str, tuple[bytes, int]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    w = CpioWriter()
    kept: dict[str, tuple[bytes, int]] = {}
    for path, (data, mode) in sorted(tree.items()):
        try:
            w.add_file(path, data, mode)
        except ImageError:  # a path that is also another file's parent: refused, fine
            continue
        kept[path] = (data, mode)
    archive = w.to_bytes("gzip")
    assert archive == w.to_bytes("gzip")
    raw = gzip.decompress(archive)
    assert cpio_list(raw) == [e.path for e in w.entries()]
    dest = tmp_path_factory.mktemp("prop")
    cpio_extract(raw, dest)
    for path, (data, mode) in kept.items():
        assert (dest / path).read_bytes() == data
        if IS_ROOT or mode & 0o200:
            assert stat.S_IMODE((dest / path).stat().st_mode) == mode
