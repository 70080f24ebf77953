"""edgevirt's own newc ("070701") cpio writer, deterministic, plus a small reader.

The Linux initramfs format is the SVR4 "newc" cpio archive (``Documentation/driver-api/
early-userspace/buffer-format.rst``): a 110-byte ASCII header of the magic and 13 hex
fields, the NUL-terminated name, padding to 4 bytes, the data, padding to 4 bytes; the last
entry is named ``TRAILER!!!``.

Determinism (the same inputs give the same bytes, on any host, as any user):

* entries are sorted by path (component-wise), parent directories are created when implied;
* uid/gid are 0, mtime is fixed (``SOURCE_DATE_EPOCH`` or 0), inode numbers are assigned in
  archive order, directory ``nlink`` is 2 + the number of sub-directories;
* device nodes are plain header fields (``rdevmajor``/``rdevminor``), so no root is needed;
* gzip output has a fixed header (mtime 0, no file name, OS 255) written by this module.

Paths inside the archive are relative (``bin/busybox``), as ``gen_init_cpio`` writes them.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from edgevirt.errors import ImageError

MAGIC = b"070701"
HEADER_SIZE = 110
TRAILER = "TRAILER!!!"
#: Linux ``PATH_MAX`` (the kernel's unpacker refuses longer names, NUL included).
PATH_MAX = 4096
NAME_MAX = 255
#: newc sizes are 8 hex digits.
MAX_FILE_SIZE = 0xFFFF_FFFF
#: Linux ``dev_t`` as the initramfs unpacker builds it (``new_encode_dev``): 12 + 20 bits.
MAX_MAJOR = (1 << 12) - 1
MAX_MINOR = (1 << 20) - 1

#: The newc header fields after the magic, in order (each 8 hex digits).
FIELDS = (
    "ino",
    "mode",
    "uid",
    "gid",
    "nlink",
    "mtime",
    "filesize",
    "devmajor",
    "devminor",
    "rdevmajor",
    "rdevminor",
    "namesize",
    "check",
)

Compress = Literal["gzip"] | None


def source_date_epoch() -> int:
    """``$SOURCE_DATE_EPOCH`` (reproducible-builds.org) or 0."""
    raw = os.environ.get("SOURCE_DATE_EPOCH")
    if raw is None or raw == "":
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise ImageError(f"SOURCE_DATE_EPOCH={raw!r} is not an integer") from None
    if not 0 <= value <= 0xFFFF_FFFF:
        raise ImageError(f"SOURCE_DATE_EPOCH={value} does not fit the 32-bit cpio mtime")
    return value


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. ``mode`` includes the file-type bits (``S_IFREG`` …)."""

    path: str
    mode: int
    data: bytes = b""  # file contents, or the symlink target
    rdevmajor: int = 0
    rdevminor: int = 0
    implied: bool = False  # a parent directory nobody added explicitly

    @property
    def kind(self) -> str:
        return _KIND_NAMES.get(stat.S_IFMT(self.mode), "?")

    def same_content(self, other: CpioEntry) -> bool:
        return (self.mode, self.data, self.rdevmajor, self.rdevminor) == (
            other.mode,
            other.data,
            other.rdevmajor,
            other.rdevminor,
        )


_KIND_NAMES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


def normalize_path(path: str) -> str:
    """Check an archive path and return it in canonical form (``a/b``, no trailing slash).

    Refused: empty, absolute, ``.``/``..`` components, empty components, NUL, non-UTF-8,
    longer than ``PATH_MAX`` or a component longer than ``NAME_MAX``.
    """
    if not isinstance(path, str):
        raise ImageError(f"archive path {path!r} is not a string")
    if path.startswith("/"):
        raise ImageError(f"archive path {path!r} is absolute; archive paths are relative")
    if "\0" in path:
        raise ImageError(f"archive path {path!r} contains a NUL byte")
    stripped = path[:-1] if path.endswith("/") else path
    parts = stripped.split("/")
    if not stripped or any(p in ("", ".", "..") for p in parts):
        raise ImageError(f"archive path {path!r} is empty or has an empty, '.' or '..' component")
    try:
        encoded = stripped.encode("utf-8")
    except UnicodeEncodeError:
        raise ImageError(f"archive path {path!r} is not valid UTF-8") from None
    if len(encoded) + 1 > PATH_MAX:
        raise ImageError(
            f"archive path {stripped[:40]!r}… is {len(encoded)} bytes; limit {PATH_MAX - 1}"
        )
    for p in parts:
        if len(p.encode("utf-8")) > NAME_MAX:
            raise ImageError(
                f"archive path {stripped!r}: component {p[:40]!r}… is "
                f"{len(p.encode('utf-8'))} bytes; limit {NAME_MAX}"
            )
    return stripped


def _sort_key(path: str) -> tuple[bytes, ...]:
    return tuple(p.encode("utf-8") for p in path.split("/"))


def _check_perm(path: str, mode: int) -> int:
    if not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise ImageError(
            f"{path}: mode {mode!r} must be permission bits only (0..0o7777), "
            "the type comes from the add_* call"
        )
    return mode


class CpioWriter:
    """Collect entries, then :meth:`write` a deterministic newc archive.

    Adding the same path twice with the same content is a no-op; with different content it
    is an :class:`ImageError`. A directory that was only implied by a child takes the mode
    of a later explicit :meth:`add_dir`.
    """

    def __init__(self, *, mtime: int | None = None, implied_dir_mode: int = 0o755) -> None:
        self.mtime = source_date_epoch() if mtime is None else mtime
        if not 0 <= self.mtime <= 0xFFFF_FFFF:
            raise ImageError(f"mtime {self.mtime} does not fit the 32-bit cpio field")
        self.implied_dir_mode = _check_perm("(implied directories)", implied_dir_mode)
        self._entries: dict[str, CpioEntry] = {}

    # -- adding ----------------------------------------------------------------------------

    def __contains__(self, path: str) -> bool:
        return normalize_path(path) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, path: str) -> CpioEntry | None:
        return self._entries.get(normalize_path(path))

    def add_file(self, path: str, data: bytes | bytearray | memoryview, mode: int = 0o644) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ImageError(f"{path}: file data must be bytes, not {type(data).__name__}")
        data = bytes(data)
        if len(data) > MAX_FILE_SIZE:
            raise ImageError(
                f"{path}: {len(data)} bytes does not fit the newc size field "
                f"(limit {MAX_FILE_SIZE})"
            )
        self._add(CpioEntry(normalize_path(path), stat.S_IFREG | _check_perm(path, mode), data))

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        self._add(CpioEntry(normalize_path(path), stat.S_IFDIR | _check_perm(path, mode)))

    def add_symlink(self, path: str, target: str) -> None:
        if not isinstance(target, str) or not target or "\0" in target:
            raise ImageError(f"{path}: symlink target {target!r} is empty or contains NUL")
        raw = target.encode("utf-8", "surrogateescape")
        if len(raw) >= PATH_MAX:
            raise ImageError(f"{path}: symlink target is {len(raw)} bytes; limit {PATH_MAX - 1}")
        self._add(CpioEntry(normalize_path(path), stat.S_IFLNK | 0o777, raw))

    def add_device(
        self, path: str, kind: Literal["c", "b"], major: int, minor: int, mode: int = 0o600
    ) -> None:
        if kind not in ("c", "b"):
            raise ImageError(f"{path}: device kind {kind!r} must be 'c' or 'b'")
        if not isinstance(major, int) or not 0 <= major <= MAX_MAJOR:
            raise ImageError(f"{path}: device major {major!r} out of range 0..{MAX_MAJOR}")
        if not isinstance(minor, int) or not 0 <= minor <= MAX_MINOR:
            raise ImageError(f"{path}: device minor {minor!r} out of range 0..{MAX_MINOR}")
        ftype = stat.S_IFCHR if kind == "c" else stat.S_IFBLK
        entry = CpioEntry(normalize_path(path), ftype | _check_perm(path, mode), b"", major, minor)
        self._add(entry)

    def add_tree(self, host_dir: str | os.PathLike[str], prefix: str = "") -> int:
        """Add everything below ``host_dir`` (not the directory itself) under ``prefix``.

        Permission bits come from the host; owners and times do not. Directories that are
        already in the archive are merged (they keep their mode). Symlinks are stored as
        symlinks (never followed); device nodes keep their numbers; FIFOs and sockets are
        refused. Returns the number of entries added.
        """
        root = Path(host_dir)
        if not root.is_dir():
            raise ImageError(f"add_tree: {root} is not a directory")
        base = normalize_path(prefix) + "/" if prefix else ""
        if base:
            self._imply_parents(base + "x")  # the prefix and its parents
        count = 0
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, root)
            for name in sorted(dirnames + filenames):
                host = os.path.join(dirpath, name)
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                arc = base + os.fsdecode(rel)
                self._add_host(host, arc)
                count += 1
        return count

    def _add_host(self, host: str, arc: str) -> None:
        try:
            st = os.lstat(host)
            perm = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                self.add_symlink(arc, os.readlink(host))
            elif stat.S_ISDIR(st.st_mode):
                have = self._entries.get(normalize_path(arc))
                if have is None or have.implied or not stat.S_ISDIR(have.mode):
                    self.add_dir(arc, perm)  # an existing directory keeps its mode: merge
            elif stat.S_ISREG(st.st_mode):
                self.add_file(arc, Path(host).read_bytes(), perm)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                kind: Literal["c", "b"] = "c" if stat.S_ISCHR(st.st_mode) else "b"
                self.add_device(arc, kind, os.major(st.st_rdev), os.minor(st.st_rdev), perm)
            else:
                raise ImageError(
                    f"{host}: {_KIND_NAMES.get(stat.S_IFMT(st.st_mode))} "
                    "entries are not supported in an initramfs tree"
                )
        except OSError as e:
            raise ImageError(f"cannot read {host}: {e.strerror}") from e

    def _imply_parents(self, path: str) -> None:
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            have = self._entries.get(parent)
            if have is None:
                self._entries[parent] = CpioEntry(
                    parent, stat.S_IFDIR | self.implied_dir_mode, implied=True
                )
            elif not stat.S_ISDIR(have.mode):
                raise ImageError(
                    f"{path}: parent {parent!r} is already in the archive as a {have.kind}"
                )

    def _add(self, entry: CpioEntry) -> None:
        self._imply_parents(entry.path)
        have = self._entries.get(entry.path)
        if have is not None:
            if have.implied and stat.S_ISDIR(entry.mode):
                pass  # an explicit directory replaces an implied one
            elif have.same_content(entry):
                return
            else:
                raise ImageError(
                    f"{entry.path}: added twice with different content "
                    f"({have.kind} {stat.S_IMODE(have.mode):o}, {len(have.data)} bytes vs "
                    f"{entry.kind} {stat.S_IMODE(entry.mode):o}, {len(entry.data)} bytes)"
                )
        self._entries[entry.path] = entry

    # -- writing ---------------------------------------------------------------------------

    def entries(self) -> list[CpioEntry]:
        """The entries in archive order (sorted, parents first)."""
        return [self._entries[k] for k in sorted(self._entries, key=_sort_key)]

    def _nlinks(self) -> dict[str, int]:
        subdirs: dict[str, int] = {}
        for path, e in self._entries.items():
            if stat.S_ISDIR(e.mode) and "/" in path:
                parent = path.rsplit("/", 1)[0]
                subdirs[parent] = subdirs.get(parent, 0) + 1
        return subdirs

    def iter_chunks(self) -> Iterator[bytes]:
        """The uncompressed archive, entry by entry."""
        subdirs = self._nlinks()
        ino = 0
        for ino, e in enumerate(self.entries(), start=1):
            nlink = 2 + subdirs.get(e.path, 0) if stat.S_ISDIR(e.mode) else 1
            yield _entry_bytes(
                e.path.encode("utf-8"),
                ino,
                e.mode,
                nlink,
                self.mtime,
                e.data,
                e.rdevmajor,
                e.rdevminor,
            )
        yield _entry_bytes(TRAILER.encode(), 0, 0, 1, 0, b"", 0, 0)

    def to_bytes(self, compress: Compress = "gzip") -> bytes:
        """The whole archive in memory (same bytes as :meth:`write`)."""
        if compress not in ("gzip", None):
            raise ImageError(f"unknown compression {compress!r}; use 'gzip' or None")
        raw = b"".join(self.iter_chunks())
        return gzip_deterministic(raw) if compress == "gzip" else raw

    def write(self, fileobj: BinaryIO, compress: Compress = "gzip") -> int:
        """Write the archive to ``fileobj``; returns the number of bytes written."""
        if compress not in ("gzip", None):
            raise ImageError(f"unknown compression {compress!r}; use 'gzip' or None")
        if compress is None:
            total = 0
            for chunk in self.iter_chunks():
                fileobj.write(chunk)
                total += len(chunk)
            return total
        gz = _GzipStream(fileobj)
        for chunk in self.iter_chunks():
            gz.write(chunk)
        return gz.close()

    def write_to(self, path: str | os.PathLike[str], compress: Compress = "gzip") -> int:
        """Write atomically to ``path`` (temporary file + rename)."""
        out = Path(path)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                n = self.write(f, compress)
            os.replace(tmp, out)
        except OSError as e:
            raise ImageError(f"cannot write {out}: {e.strerror}") from e
        finally:
            tmp.unlink(missing_ok=True)
        return n


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _entry_bytes(
    name: bytes, ino: int, mode: int, nlink: int, mtime: int, data: bytes, rmaj: int, rmin: int
) -> bytes:
    values = (ino, mode, 0, 0, nlink, mtime, len(data), 0, 0, rmaj, rmin, len(name) + 1, 0)
    header = MAGIC + b"".join(b"%08X" % v for v in values) + name + b"\0"
    return header + _pad4(len(header)) + data + _pad4(len(data))


# -- gzip ------------------------------------------------------------------------------------

#: ID1 ID2 CM=deflate FLG=0 MTIME=0 XFL=2 (best compression) OS=255 (unknown).
GZIP_HEADER = b"\x1f\x8b\x08\x00" + b"\0\0\0\0" + b"\x02\xff"


class _GzipStream:
    """A gzip member with a fixed header: what ``gzip -n -9`` writes, byte for byte stable."""

    def __init__(self, fileobj: BinaryIO) -> None:
        self._f = fileobj
        self._z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS, 9)
        self._crc = 0
        self._size = 0
        self._written = len(GZIP_HEADER)
        fileobj.write(GZIP_HEADER)

    def write(self, data: bytes) -> None:
        self._crc = zlib.crc32(data, self._crc)
        self._size += len(data)
        out = self._z.compress(data)
        if out:
            self._f.write(out)
            self._written += len(out)

    def close(self) -> int:
        tail = self._z.flush() + struct.pack("<II", self._crc, self._size & 0xFFFF_FFFF)
        self._f.write(tail)
        return self._written + len(tail)


def gzip_deterministic(data: bytes) -> bytes:
    """``data`` as a gzip member with a fixed header (same bytes for the same input)."""
    buf = io.BytesIO()
    gz = _GzipStream(buf)
    gz.write(data)
    gz.close()
    return buf.getvalue()


# -- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpioRecord:
    """One header as read back, with every field (for inspection and tests)."""

    name: str
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    rdevmajor: int
    rdevminor: int
    data: bytes
    offset: int  # of the header in the uncompressed archive


def read_cpio(data: bytes, *, source: str = "<cpio>") -> list[CpioRecord]:
    """Parse a newc archive (gzip-compressed or not) up to and excluding ``TRAILER!!!``."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise ImageError(f"{source}: bad gzip stream: {e}") from e
    out: list[CpioRecord] = []
    off = 0
    while True:
        head = data[off : off + HEADER_SIZE]
        if len(head) < HEADER_SIZE:
            raise ImageError(f"{source}: truncated header at offset {off} (no {TRAILER})")
        if head[:6] != MAGIC:
            raise ImageError(f"{source}: bad magic {head[:6]!r} at offset {off}")
        # int(x, 16) would also take signs, blanks and underscores: check the digits first.
        if head[6:HEADER_SIZE].strip(b"0123456789abcdefABCDEF"):
            raise ImageError(f"{source}: non-hex header field at offset {off}")
        v = dict(
            zip(FIELDS, (int(head[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)), strict=True)
        )
        name_end = off + HEADER_SIZE + v["namesize"]
        if v["namesize"] < 1 or name_end > len(data) or data[name_end - 1] != 0:
            raise ImageError(f"{source}: bad name size {v['namesize']} at offset {off}")
        name = data[off + HEADER_SIZE : name_end - 1].decode("utf-8", "surrogateescape")
        data_off = name_end + (-name_end % 4)
        data_end = data_off + v["filesize"]
        if data_end > len(data):
            raise ImageError(f"{source}: {name}: data runs past the end at offset {off}")
        if name == TRAILER:
            return out
        out.append(
            CpioRecord(
                name,
                v["ino"],
                v["mode"],
                v["uid"],
                v["gid"],
                v["nlink"],
                v["mtime"],
                v["rdevmajor"],
                v["rdevminor"],
                data[data_off:data_end],
                off,
            )
        )
        off = data_end + (-data_end % 4)
