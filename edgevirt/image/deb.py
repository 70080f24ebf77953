"""Read a Debian binary package (.deb) in pure Python, without dpkg.

A .deb is an ``ar`` archive (``deb(5)``): the global magic ``!<arch>\\n``, then members, each a
60-byte ASCII header (name 16, mtime 12, uid 6, gid 6, mode 8, size 10, ``\\x60\\n``) and the
data padded to an even offset. The members are ``debian-binary`` ("2.0\\n"), ``control.tar.*``
and ``data.tar.*`` (uncompressed, gz, xz, lzma, bz2 or zst). edgevirt uses it to take
``/bin/busybox`` out of ``busybox-static:arm64`` without installing a foreign package.

Every malformed input becomes an :class:`ImageError` naming the file and the byte offset.

This module only *reads*: member names come back as stored (``..`` and links included). To
put members on disk, or into an image, go through :mod:`edgevirt.image.unpack`, which applies
the path and link rules (``extract_deb``, ``checked_members``, ``read_file``).
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import importlib
import io
import lzma
import os
import shutil
import subprocess
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from edgevirt.errors import ImageError

AR_MAGIC = b"!<arch>\n"
AR_HEADER_SIZE = 60
AR_FMAG = b"`\n"
#: (field, start, end) of the ar member header.
AR_HEADER = (
    ("name", 0, 16),
    ("mtime", 16, 28),
    ("uid", 28, 34),
    ("gid", 34, 40),
    ("mode", 40, 48),
    ("size", 48, 58),
    ("fmag", 58, 60),
)
TAR_SUFFIXES = ("", ".gz", ".xz", ".lzma", ".bz2", ".zst")
#: Decompressed size beyond which a tar member of a .deb is refused (a decompression bomb;
#: Debian's largest package edgevirt reads, libpython3.11-stdlib, is ~30 MB unpacked).
MAX_TAR_BYTES = 1 << 30

MemberType = Literal["file", "dir", "symlink", "hardlink", "char", "block", "fifo"]


@dataclass(frozen=True)
class ArMember:
    name: str
    header_offset: int
    offset: int  # of the data
    size: int


@dataclass(frozen=True)
class DebMember:
    """One entry of ``data.tar``. ``path`` is absolute (``/bin/busybox``, root is ``/``)."""

    path: str
    mode: int  # permission bits
    type: MemberType
    data: bytes = b""  # regular files only
    linkname: str = ""  # symlink target as stored; hardlink target as a normalized path
    devmajor: int = 0
    devminor: int = 0
    name: str = ""  # the member name as stored in the tar (checked by edgevirt.image.unpack)


def normalize_member_path(name: str) -> str:
    """``./bin/busybox``, ``bin/busybox``, ``/bin/busybox/`` → ``/bin/busybox``."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return "/" + "/".join(parts)


def _tar_type(ti: tarfile.TarInfo) -> MemberType | None:
    if ti.isreg():
        return "file"
    if ti.isdir():
        return "dir"
    if ti.issym():
        return "symlink"
    if ti.islnk():
        return "hardlink"
    if ti.ischr():
        return "char"
    if ti.isblk():
        return "block"
    if ti.isfifo():
        return "fifo"
    return None


class _Capped(io.RawIOBase):
    """A read-only stream that refuses to yield more than ``limit`` bytes."""

    def __init__(self, inner: IO[bytes] | io.BufferedIOBase, limit: int, what: str) -> None:
        self._inner, self._left, self._limit, self._what = inner, limit, limit, what

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size if size >= 0 else self._left + 1)
        self._left -= len(data)
        if self._left < 0:
            raise ImageError(
                f"{self._what}: more than {self._limit} bytes once decompressed "
                "(a decompression bomb?)"
            )
        return data

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


class DebArchive:
    """The ar index of a .deb, and readers for its control and data archives."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.members: list[ArMember] = self._read_index()
        self._check_layout()

    # -- ar layer --------------------------------------------------------------------------

    def _error(self, offset: int, what: str) -> ImageError:
        return ImageError(f"{self.path}: offset {offset}: {what}")

    def _read_index(self) -> list[ArMember]:
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                magic = f.read(len(AR_MAGIC))
                if magic != AR_MAGIC:
                    raise self._error(
                        0, f"not an ar archive (magic {magic!r}, expected {AR_MAGIC!r})"
                    )
                members: list[ArMember] = []
                off = len(AR_MAGIC)
                while off < size:
                    if off == size - 1 and f.read(1) == b"\n":
                        break  # some writers pad the archive end
                    members.append(self._read_header(f, off, size))
                    m = members[-1]
                    off = m.offset + m.size + (m.offset + m.size) % 2
                    f.seek(off)
                return members
        except OSError as e:
            raise ImageError(f"cannot read {self.path}: {e.strerror}") from e

    def _read_header(self, f: IO[bytes], off: int, file_size: int) -> ArMember:
        raw = f.read(AR_HEADER_SIZE)
        if len(raw) < AR_HEADER_SIZE:
            raise self._error(
                off, f"truncated ar member header ({len(raw)} of {AR_HEADER_SIZE} bytes)"
            )
        h = {name: raw[a:b] for name, a, b in AR_HEADER}
        if h["fmag"] != AR_FMAG:
            raise self._error(off, f"bad ar header terminator {h['fmag']!r} (expected {AR_FMAG!r})")
        size_field = h["size"].decode("ascii", "replace").strip()
        if not size_field.isdigit():
            raise self._error(off + 48, f"bad ar member size field {h['size']!r}")
        size = int(size_field)
        name = h["name"].decode("ascii", "replace").rstrip(" ")
        data_off = off + AR_HEADER_SIZE
        if name.startswith("#1/"):  # BSD: the name is the first N bytes of the data
            n = name[3:]
            if not n.isdigit() or int(n) > size:
                raise self._error(off, f"bad BSD ar long name {name!r}")
            name = f.read(int(n)).rstrip(b"\0").decode("utf-8", "replace")
            data_off += int(n)
            size -= int(n)
        elif name.endswith("/") and name != "/":
            name = name[:-1]  # GNU terminates names with '/'
        if data_off + size > file_size:
            raise self._error(
                off,
                f"ar member {name!r} is {size} bytes but only "
                f"{max(0, file_size - data_off)} remain (file truncated?)",
            )
        return ArMember(name, off, data_off, size)

    def _check_layout(self) -> None:
        if not self.members:
            raise self._error(len(AR_MAGIC), "empty ar archive, not a .deb")
        first = self.members[0]
        if first.name != "debian-binary":
            raise self._error(
                first.header_offset,
                f"first member is {first.name!r}, expected 'debian-binary' (not a .deb?)",
            )
        version = self.read_member("debian-binary")
        if not version.startswith(b"2."):
            raise self._error(first.offset, f"unsupported .deb format version {version!r}")
        self.find_member("control.tar")
        self.find_member("data.tar")

    def read_member(self, name: str) -> bytes:
        for m in self.members:
            if m.name == name:
                return self._read_at(m)
        raise ImageError(
            f"{self.path}: no ar member {name!r} "
            f"(members: {', '.join(x.name for x in self.members)})"
        )

    def _read_at(self, m: ArMember) -> bytes:
        try:
            with open(self.path, "rb") as f:
                f.seek(m.offset)
                data = f.read(m.size)
        except OSError as e:
            raise ImageError(f"cannot read {self.path}: {e.strerror}") from e
        if len(data) != m.size:
            raise self._error(m.offset, f"ar member {m.name!r} truncated")
        return data

    def find_member(self, stem: str) -> ArMember:
        """The ``control.tar*`` or ``data.tar*`` member."""
        for m in self.members:
            if m.name.startswith(stem) and m.name[len(stem) :] in TAR_SUFFIXES:
                return m
        for m in self.members:
            if m.name.startswith(stem):
                raise self._error(
                    m.header_offset,
                    f"unsupported compression for {m.name!r} "
                    f"(known: {', '.join(TAR_SUFFIXES[1:])})",
                )
        raise self._error(
            len(AR_MAGIC),
            f"no {stem}.* member (members: {', '.join(x.name for x in self.members)})",
        )

    # -- tar layer -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _tar(self, stem: str) -> Iterator[tarfile.TarFile]:
        """The single choke point that turns decompression and tar errors into ImageError."""
        m = self.find_member(stem)
        raw = self._read_at(m)
        suffix = m.name[len(stem) :]
        zstd_error: type[Exception] | None = None
        try:
            stream: IO[bytes] | io.BufferedIOBase
            if suffix == ".gz":
                stream = gzip.GzipFile(fileobj=io.BytesIO(raw), mode="rb")
            elif suffix in (".xz", ".lzma"):
                stream = lzma.LZMAFile(io.BytesIO(raw))
            elif suffix == ".bz2":
                stream = bz2.BZ2File(io.BytesIO(raw))
            elif suffix == ".zst":
                stream, zstd_error = self._unzstd(raw, m)
            else:
                stream = io.BytesIO(raw)
            capped = _Capped(stream, MAX_TAR_BYTES, f"{self.path}: {m.name}")
            with tarfile.open(fileobj=capped, mode="r|") as tf:  # type: ignore[call-overload]
                yield tf
        except ImageError:
            raise
        except (tarfile.TarError, EOFError, OSError, lzma.LZMAError, zlib.error, ValueError) as e:
            raise self._error(m.offset, f"corrupt {m.name}: {e}") from e
        except Exception as e:
            if zstd_error is not None and isinstance(e, zstd_error):
                raise self._error(m.offset, f"corrupt {m.name}: zstd: {e}") from e
            raise

    def _unzstd(self, raw: bytes, m: ArMember) -> tuple[IO[bytes], type[Exception] | None]:
        """A stream of the decompressed data and the decompressor's own error class.

        Debian (since trixie for some packages) and Ubuntu compress data.tar with zstd. The
        ``zstandard`` package is a dependency of edgevirt; Python 3.14's ``compression.zstd``
        and the ``zstd`` command are fallbacks.
        """
        for modname in ("compression.zstd", "zstandard"):
            try:
                mod = importlib.import_module(modname)
            except ImportError:
                continue
            if modname == "zstandard":
                dctx = mod.ZstdDecompressor()
                return dctx.stream_reader(io.BytesIO(raw), read_across_frames=True), mod.ZstdError
            return mod.ZstdFile(io.BytesIO(raw)), mod.ZstdError
        exe = shutil.which("zstd")
        if exe is None:
            raise ImageError(
                f"{self.path}: {m.name} is zstd-compressed and neither a Python zstd module "
                "nor the `zstd` command is available",
                hint="pip install zstandard (an edgevirt dependency), or apt-get install zstd",
            )
        proc = subprocess.run([exe, "-dc"], input=raw, capture_output=True, check=False)
        if proc.returncode != 0:
            raise self._error(
                m.offset,
                f"zstd could not decompress {m.name}: "
                f"{proc.stderr.decode(errors='replace').strip()}",
            )
        return io.BytesIO(proc.stdout), None

    def iter_tar(self, stem: str = "data.tar") -> Iterator[DebMember]:
        """Every entry of ``data.tar`` (or ``control.tar``) in archive order."""
        with self._tar(stem) as tf:
            for ti in tf:
                kind = _tar_type(ti)
                if kind is None:
                    m = self.find_member(stem)
                    raise self._error(
                        m.offset, f"{ti.name}: unsupported tar entry type {ti.type!r}"
                    )
                data = b""
                if kind == "file":
                    fo = tf.extractfile(ti)
                    data = fo.read() if fo is not None else b""
                    if len(data) != ti.size:
                        raise self._error(
                            self.find_member(stem).offset,
                            f"{ti.name}: truncated ({len(data)} of {ti.size})",
                        )
                link = ti.linkname
                if kind == "hardlink":
                    link = normalize_member_path(link)
                yield DebMember(
                    normalize_member_path(ti.name),
                    ti.mode & 0o7777,
                    kind,
                    data,
                    link,
                    ti.devmajor,
                    ti.devminor,
                    ti.name,
                )

    def iter_data(self) -> Iterator[DebMember]:
        return self.iter_tar("data.tar")

    def get(self, path: str, *, _hops: int = 0) -> DebMember:
        """The ``data.tar`` entry at ``path`` (hard links resolved to their target's data)."""
        want = normalize_member_path(path)
        for mem in self.iter_data():
            if mem.path == want:
                if mem.type == "hardlink":
                    if _hops >= 8:
                        raise ImageError(
                            f"{self.path}: {want}: hard-link chain longer than 8 (a loop?)"
                        )
                    # A second pass: tar stores the target before the link.
                    target = self.get(mem.linkname, _hops=_hops + 1)
                    return DebMember(want, mem.mode, target.type, target.data, target.linkname)
                return mem
        raise ImageError(f"{self.path}: no {want} in data.tar")

    def read_file(self, path: str) -> bytes:
        """The contents of the regular file at ``path`` in ``data.tar``."""
        mem = self.get(path)
        if mem.type != "file":
            what = f" -> {mem.linkname}" if mem.type == "symlink" else ""
            raise ImageError(f"{self.path}: {mem.path} is a {mem.type}{what}, not a regular file")
        return mem.data

    def control(self) -> dict[str, str]:
        """The fields of ``./control`` in ``control.tar`` (continuation lines joined)."""
        text = ""
        for mem in self.iter_tar("control.tar"):
            if mem.path == "/control" and mem.type == "file":
                text = mem.data.decode("utf-8", "replace")
                break
        else:
            raise ImageError(f"{self.path}: control.tar has no ./control file")
        fields: dict[str, str] = {}
        key = ""
        for line in text.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                key = key.strip()
                fields[key] = value.strip()
        return fields


def iter_deb(deb: str | os.PathLike[str]) -> Iterator[DebMember]:
    """Every entry of a .deb's ``data.tar``."""
    return DebArchive(deb).iter_data()


def read_deb_file(deb: str | os.PathLike[str], path: str) -> bytes:
    """One regular file out of a .deb's ``data.tar``."""
    return DebArchive(deb).read_file(path)
