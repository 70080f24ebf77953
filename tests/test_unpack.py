"""Unpacking archive members (edgevirt.image.unpack): the path-traversal defect and its rules.

The crafted .debs are what an attacker would hand ``apt-get download`` (a mirror, a proxy, a
cache): a ``..`` member and a member written through a symlink, each of which wrote outside
the staging directory before the fix. Oracle for the well-formed case: ``dpkg-deb -x``.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from edgevirt.errors import ImageError
from edgevirt.image import deb as debmod
from edgevirt.image import python_cross as pc
from edgevirt.image import unpack
from edgevirt.image.deb import DebMember

# (name, kind, payload): kind is "file", "dir", "sym", "hard", "chr", "fifo"
Entry = tuple[str, str, bytes | str]

HEADER = ("./usr/include/python3.11/Python.h", "file", b"/* Python.h */\n")


def _tar(entries: Sequence[Entry], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    kinds = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE,
             "hard": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}  # fmt: skip
    with tarfile.open(fileobj=buf, mode=mode, format=tarfile.GNU_FORMAT) as tf:  # type: ignore[call-overload]
        for name, kind, payload in entries:
            ti = tarfile.TarInfo(name)
            ti.type = kinds[kind]
            ti.mode = 0o755 if kind == "dir" else 0o644
            data = payload if isinstance(payload, bytes) else b""
            if isinstance(payload, str):
                ti.linkname = payload
            ti.size = len(data) if kind == "file" else 0
            tf.addfile(ti, io.BytesIO(data) if kind == "file" else None)
    return buf.getvalue()


def _ar(members: list[tuple[str, bytes]]) -> bytes:
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        out += (f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}").encode()
        out += b"`\n" + data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


def _deb(path: Path, entries: Sequence[Entry], suffix: str = ".gz", mode: str = "w:gz") -> Path:
    control = _tar([("./control", "file", b"Package: libpython3.11-dev\nVersion: 1\n")])
    path.write_bytes(
        _ar(
            [
                ("debian-binary", b"2.0\n"),
                ("control.tar.gz", control),
                (f"data.tar{suffix}", _tar(entries, mode)),
            ]
        )
    )
    return path


def _dev_package(deb: Path) -> pc.DebPackage:
    return pc.DebPackage(f"{pc.DEV_PACKAGE}:{pc.ARCH}", "1", deb)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# -- the defect: python_headers wrote outside its staging directory ----------------------------


def test_path_traversal_dotdot_member_in_python_headers_deb_is_refused(tmp_path: Path) -> None:
    """Regression: a ``libpython3.11-dev`` member ``./usr/include/../../../../x`` escaped."""
    work = tmp_path / "work"
    work.mkdir()
    evil = _deb(
        tmp_path / "evil.deb",
        [HEADER, ("./usr/include/../../../../escaped-by-dotdot", "file", b"pwned")],
    )
    before = _tree(tmp_path)
    with pytest.raises(ImageError, match=r"escaped-by-dotdot.*'\.\.' in the path") as ei:
        pc.python_headers(_dev_package(evil), work / "headers")
    assert str(evil) in str(ei.value)
    assert not any("escaped" in p for p in _tree(tmp_path) - before), _tree(tmp_path) - before
    assert not list(tmp_path.rglob("escaped-by-dotdot"))
    assert not list(work.glob(".headers-*")), "staging directory left behind"


@pytest.mark.parametrize(
    "link_target",
    [
        "../../../../../outside",  # relative, climbs above the root
        "ABSOLUTE",  # absolute, to a host directory (rebased into the root on disk)
        "python3.11",  # inside the root: writing through any link is refused
    ],
)
def test_path_traversal_write_through_symlink_in_python_headers_deb_is_refused(
    tmp_path: Path, link_target: str
) -> None:
    """Regression: a symlink member, then a member under it, wrote through the link."""
    outside = tmp_path / "outside"
    outside.mkdir()
    target = str(outside) if link_target == "ABSOLUTE" else link_target
    evil = _deb(
        tmp_path / "evil.deb",
        [
            HEADER,
            ("./usr/include/sneaky", "sym", target),
            ("./usr/include/sneaky/written-through-link", "file", b"pwned"),
        ],
    )
    with pytest.raises(ImageError, match="sneaky") as ei:
        pc.python_headers(_dev_package(evil), tmp_path / "work" / "headers")
    msg = str(ei.value)
    assert "leaves the root" in msg or "under the symbolic link" in msg, msg
    assert list(outside.iterdir()) == []
    assert not list(tmp_path.rglob("written-through-link"))


def test_path_traversal_in_service_rootfs_members_is_refused(tmp_path: Path) -> None:
    """The rootfs (cpio, in memory) takes its members through the same rules."""
    evil = _deb(
        tmp_path / "evil.deb",
        [("./usr/lib/x", "sym", "/etc"), ("./usr/lib/x/passwd", "file", b"root::0:0::/:/bin/sh")],
    )
    with pytest.raises(ImageError, match="under the symbolic link /usr/lib/x"):
        list(pc.members([pc.DebPackage("p:arm64", "1", evil)]))


# -- the rules one by one ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "entries,rule",
    [
        ([("/etc/passwd", "file", b"x")], "absolute path"),
        ([("./a/../../b", "file", b"x")], r"'\.\.' in the path"),
        ([("..", "dir", b"")], r"'\.\.' in the path"),
        ([("./dev/null", "chr", b"")], "char device or FIFO"),
        ([("./run/p", "fifo", b"")], "fifo device or FIFO"),
        ([("./a", "sym", "b/../../..")], "has '..' after a name"),
        ([("./a/b", "sym", "../../x")], "leaves the root"),
        ([("./a", "sym", "/")], "is the root itself"),
        ([("./a", "sym", "")], "empty target"),
        ([("./a", "hard", "/etc/shadow")], "not a regular file written before it"),
        ([("./a", "hard", "../../etc/shadow")], "not a regular file written before it"),
        ([("./a", "dir", b""), ("./a", "file", b"x")], "would replace the directory /a"),
        ([("./f", "file", b"x"), ("./f/g", "file", b"x")], "under the non-directory /f"),
        ([("./d", "file", b"x"), ("./d", "sym", "."), ("./e", "hard", "./d")],
         "not a regular file written before it"),
    ],
)  # fmt: skip
def test_unpack_rule_refuses_member(tmp_path: Path, entries: list[Entry], rule: str) -> None:
    deb = _deb(tmp_path / "bad.deb", entries)
    dest = tmp_path / "dest"
    with pytest.raises(ImageError, match=rule) as ei:
        unpack.extract_deb(deb, dest)
    assert str(deb) in str(ei.value)
    with pytest.raises(ImageError, match=rule):
        list(unpack.deb_members(deb))  # the in-memory route refuses the same
    assert {p.name for p in tmp_path.iterdir()} == {"bad.deb", "dest"}


def test_unpack_never_follows_a_link_already_in_the_destination(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "usr").symlink_to(outside)
    deb = _deb(tmp_path / "ok.deb", [("./usr/bin/tool", "file", b"x")])
    with pytest.raises(ImageError, match="link or not a directory; refused"):
        unpack.extract_deb(deb, dest)
    assert list(outside.iterdir()) == []


def test_unpack_replaces_a_file_instead_of_writing_through_its_hard_link(tmp_path: Path) -> None:
    deb = _deb(
        tmp_path / "p.deb",
        [("./a", "file", b"first"), ("./b", "hard", "./a"), ("./b", "file", b"second")],
    )
    unpack.extract_deb(deb, tmp_path / "d")
    assert (tmp_path / "d/a").read_bytes() == b"first"
    assert (tmp_path / "d/b").read_bytes() == b"second"


def test_unpack_rebases_absolute_links_on_disk_and_keeps_them_in_images(tmp_path: Path) -> None:
    deb = _deb(
        tmp_path / "p.deb",
        [
            ("./etc/python3.11/sitecustomize.py", "file", b"# site\n"),
            ("./usr/lib/python3.11/sitecustomize.py", "sym", "/etc/python3.11/sitecustomize.py"),
        ],
    )
    dest = tmp_path / "d"
    unpack.extract_deb(deb, dest)
    link = dest / "usr/lib/python3.11/sitecustomize.py"
    assert os.readlink(link) == "../../../etc/python3.11/sitecustomize.py"
    assert link.read_bytes() == b"# site\n"
    image = {m.path: m.linkname for m in unpack.deb_members(deb) if m.type == "symlink"}
    assert image == {"/usr/lib/python3.11/sitecustomize.py": "/etc/python3.11/sitecustomize.py"}


def test_unpack_strips_setuid_and_group_write_bits(tmp_path: Path) -> None:
    m = DebMember("/bin/su", 0o6777, "file", b"x", name="./bin/su")
    d = DebMember("/tmp", 0o1777, "dir", name="./tmp/")
    unpack.extract_members([d, m], tmp_path / "d")
    assert stat.S_IMODE((tmp_path / "d/bin/su").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "d/tmp").stat().st_mode) == 0o755


def test_unpack_select_copies_a_hard_link_whose_target_was_not_selected(tmp_path: Path) -> None:
    deb = _deb(
        tmp_path / "p.deb", [("./skip/a", "file", b"data"), ("./keep/b", "hard", "./skip/a")]
    )
    written = unpack.extract_deb(deb, tmp_path / "d", select=lambda p: p.startswith("/keep/"))
    assert written == ["/keep/b"]
    assert (tmp_path / "d/keep/b").read_bytes() == b"data"
    assert not (tmp_path / "d/skip").exists()


def test_unpack_read_file_checks_every_member_up_to_it(tmp_path: Path) -> None:
    deb = _deb(tmp_path / "p.deb", [("./a/../../x", "file", b"x"), ("./bin/busybox", "file", b"b")])
    with pytest.raises(ImageError, match=r"'\.\.' in the path"):
        unpack.read_file(deb, "/bin/busybox")
    ok = _deb(
        tmp_path / "ok.deb",
        [("./bin/busybox", "file", b"b"), ("./bin/sh", "hard", "./bin/busybox")],
    )
    assert unpack.read_file(ok, "bin/sh") == b"b"
    with pytest.raises(ImageError, match="no /bin/ash"):
        unpack.read_file(ok, "/bin/ash")


# -- well-formed packages: the same tree as dpkg-deb -x ----------------------------------------


def _snapshot(root: Path) -> dict[str, tuple[str, int, str]]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        kind = "l" if p.is_symlink() else "d" if p.is_dir() else "f"
        extra = os.readlink(p) if kind == "l" else p.read_bytes().hex()[:64] if kind == "f" else ""
        out[str(p.relative_to(root))] = (
            kind,
            stat.S_IMODE(st.st_mode) if kind != "l" else 0,
            extra,
        )
    return out


def _tiny_tree(root: Path) -> None:
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(
        "Package: t\nVersion: 1\nArchitecture: all\nMaintainer: T <t@example.org>\nDescription: t\n"
    )
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/hello").write_bytes(b"#!/bin/sh\necho hello\n")
    (root / "usr/bin/hello").chmod(0o755)
    (root / "usr/bin/hi").symlink_to("hello")
    (root / "usr/lib").mkdir()
    (root / "usr/lib/abs").symlink_to("/usr/bin/hello")
    os.link(root / "usr/bin/hello", root / "usr/bin/hello2")


@pytest.mark.parametrize("compress", ["xz", "zstd"])
def test_unpack_matches_dpkg_deb_extract(tmp_path: Path, compress: str) -> None:
    _tiny_tree(tmp_path / "root")
    deb = tmp_path / "t.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", f"-Z{compress}", "--build", str(tmp_path / "root"),
         str(deb)], check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path / "dpkg")], check=True)
    unpack.extract_deb(deb, tmp_path / "ours")
    ours, theirs = _snapshot(tmp_path / "ours"), _snapshot(tmp_path / "dpkg")
    # the one intended difference: an absolute link is rebased inside the root
    assert ours.pop("usr/lib/abs") == ("l", 0, "../bin/hello")
    assert theirs.pop("usr/lib/abs") == ("l", 0, "/usr/bin/hello")
    assert ours == theirs
    assert (tmp_path / "ours/usr/bin/hello2").stat().st_ino == (
        tmp_path / "ours/usr/bin/hello"
    ).stat().st_ino


# -- zstd, without the zstd command ------------------------------------------------------------


def _zst_deb(tmp_path: Path) -> Path:
    zstandard = pytest.importorskip("zstandard")
    data = zstandard.ZstdCompressor().compress(_tar([("./bin/x", "file", b"payload" * 50)], "w"))
    control = _tar([("./control", "file", b"Package: p\n")])
    deb = tmp_path / "z.deb"
    deb.write_bytes(
        _ar([("debian-binary", b"2.0\n"), ("control.tar.gz", control), ("data.tar.zst", data)])
    )
    return deb


def test_deb_zstd_is_read_without_the_zstd_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deb = _zst_deb(tmp_path)
    monkeypatch.setattr(debmod.shutil, "which", lambda _name: None)
    assert unpack.read_file(deb, "/bin/x") == b"payload" * 50


def test_deb_corrupt_zstd_is_image_error_with_offset(tmp_path: Path) -> None:
    deb = _zst_deb(tmp_path)
    raw = bytearray(deb.read_bytes())
    raw[-40:-20] = b"\xee" * 20
    deb.write_bytes(bytes(raw))
    with pytest.raises(ImageError, match=r"offset \d+: corrupt data.tar.zst"):
        list(debmod.DebArchive(deb).iter_data())


def test_deb_decompression_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deb = _deb(tmp_path / "bomb.deb", [("./zeros", "file", bytes(200_000))])
    monkeypatch.setattr(debmod, "MAX_TAR_BYTES", 100_000)
    with pytest.raises(ImageError, match="more than 100000 bytes once decompressed"):
        list(debmod.DebArchive(deb).iter_data())


# -- a user's kernel tarball: the same rules before GNU tar unpacks it ------------------------


def test_check_tarball_applies_the_rules_to_a_kernel_tarball(tmp_path: Path) -> None:
    good = tmp_path / "linux.tar.xz"
    good.write_bytes(_tar([("linux-6.1/", "dir", b""), ("linux-6.1/Makefile", "file", b"x"),
                           ("linux-6.1/l", "sym", "Makefile")], "w:xz"))  # fmt: skip
    assert unpack.check_tarball(good) == 3
    for entries, rule in (
        ([("linux-6.1/../../etc/cron.d/x", "file", b"x")], r"'\.\.' in the path"),
        ([("linux-6.1/dev", "chr", b"")], "char device"),
        ([("linux-6.1/l", "sym", "/etc"), ("linux-6.1/l/passwd", "file", b"x")],
         "under the symbolic link"),
    ):  # fmt: skip
        bad = tmp_path / "bad.tar.gz"
        bad.write_bytes(_tar(entries, "w:gz"))
        with pytest.raises(ImageError, match=rule):
            unpack.check_tarball(bad)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar archive at all" * 40)
    with pytest.raises(ImageError, match="not a readable tar archive"):
        unpack.check_tarball(junk)
