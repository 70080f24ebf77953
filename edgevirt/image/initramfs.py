"""Build the guest initramfs: a static AArch64 busybox, ``/init``, and what the tests add.

The busybox comes from Debian's ``busybox-static:arm64`` (``apt-get download``, then read out
of the .deb by :mod:`edgevirt.image.deb`: nothing foreign is installed on the host). The
archive is a gzip newc cpio from :mod:`edgevirt.image.cpio`: the same inputs give the same
bytes.

Layout::

    /bin/busybox            the binary (checked: AArch64, static)
    /bin/<applet>           symlinks "busybox" for APPLETS (busybox --list cannot run cross-arch)
    /sbin /usr/bin /usr/sbin symlinks to bin
    /init                   the init script (mode 755)
    /dev/console /dev/null  c 5 1 and c 1 3, so the kernel has a console before devtmpfs
    /proc /sys /dev /tmp /root /etc /mnt /run
    + extra_files, + overlay_dir, + overlays (in order)
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from edgevirt.errors import EdgevirtError, ImageError
from edgevirt.image import unpack
from edgevirt.image.cpio import CpioWriter
from edgevirt.image.elfcheck import ElfInfo, check_elf

log = logging.getLogger(__name__)

BUSYBOX_PACKAGE = "busybox-static:arm64"
BUSYBOX_DEB_GLOB = "busybox-static_*_arm64.deb"
BUSYBOX_PATH_IN_DEB = "/bin/busybox"
APT_HINT = "run `dpkg --add-architecture arm64 && apt-get update` (as root), then retry"

#: Applets linked in /bin. All are in Debian 12's busybox-static 1.35 (a test checks it
#: against the binary's applet table). Grouped by who needs them.
APPLETS: tuple[str, ...] = (
    # shell and init
    "sh", "ash", "cttyhack", "setsid", "stty", "tty", "mount", "umount", "mkdir", "mknod",
    "switch_root", "poweroff", "reboot", "halt", "sync", "sleep", "usleep", "true", "false",
    "test", "[", "[[", "echo", "printf", "env", "hostname", "uname", "dmesg", "sysctl",
    # files and text
    "cat", "ls", "cp", "mv", "rm", "rmdir", "ln", "touch", "chmod", "chown", "stat",
    "readlink", "realpath", "basename", "dirname", "mktemp", "find", "xargs", "grep", "egrep",
    "head", "tail", "cut", "tr", "awk", "sed", "wc", "sort", "uniq", "tee", "seq", "expr",
    "od", "hexdump", "xxd", "strings", "cmp", "diff", "which", "yes", "truncate",
    # block I/O and checksums
    "dd", "sha256sum", "sha1sum", "sha512sum", "md5sum", "crc32", "blockdev", "losetup",
    "gzip", "gunzip", "zcat", "cpio", "tar",
    # processes, time, system
    "ps", "kill", "killall", "pidof", "free", "df", "du", "uptime", "date", "time",
    "timeout", "nproc", "taskset", "hwclock", "devmem", "watch", "id",
    # modules, devices, network
    "insmod", "rmmod", "lsmod", "modprobe", "modinfo", "mdev", "i2cdetect", "i2cget",
    "i2cset", "i2cdump", "i2ctransfer", "ip", "ifconfig", "ping", "nc", "udhcpc",
)  # fmt: skip

#: Directories every initramfs has, with their modes.
BASE_DIRS: dict[str, int] = {
    "bin": 0o755, "dev": 0o755, "etc": 0o755, "mnt": 0o755, "proc": 0o555, "root": 0o700,
    "run": 0o755, "sys": 0o555, "tmp": 0o1777, "usr": 0o755,
}  # fmt: skip

#: (path, kind, major, minor, mode): the kernel opens /dev/console before any devtmpfs.
BASE_DEVICES: tuple[tuple[str, str, int, int, int], ...] = (
    ("dev/console", "c", 5, 1, 0o600),
    ("dev/null", "c", 1, 3, 0o666),
)


# -- busybox ---------------------------------------------------------------------------------


def download_deb(
    package: str,
    glob: str,
    cache_dir: Path,
    *,
    timeout: float = 300,
    error: type[EdgevirtError] = ImageError,
) -> Path:
    """``apt-get download package`` into ``cache_dir`` unless a .deb matching ``glob`` is
    there (a file put there by hand counts too: offline machines). Failures raise ``error``
    (callers choose the layer's exception, hence the exit code)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = sorted(cache_dir.glob(glob))
    if cached:
        return cached[-1]
    if shutil.which("apt-get") is None:
        raise error(
            f"cannot download {package}: apt-get not found",
            hint=f"put a {glob} into {cache_dir}",
        )
    # Download into a private directory, then rename: concurrent builds never see half a file.
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        cmd = ["apt-get", "download", package]
        log.info("downloading %s into %s", package, cache_dir)
        try:
            proc = subprocess.run(
                cmd, cwd=tmp, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise error(
                f"`{' '.join(cmd)}` took longer than {timeout:.0f} s", hint=APT_HINT
            ) from None
        debs = sorted(Path(tmp).glob(glob))
        if proc.returncode != 0 or not debs:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            raise error(
                f"`{' '.join(cmd)}` failed (exit {proc.returncode}): "
                f"{detail[-1] if detail else 'no .deb produced'}",
                hint=APT_HINT,
            )
        final = cache_dir / debs[-1].name
        os.replace(debs[-1], final)
    return final


def download_busybox_deb(cache_dir: Path, *, timeout: float = 300) -> Path:
    """``apt-get download busybox-static:arm64`` into ``cache_dir`` unless a .deb is there."""
    return download_deb(BUSYBOX_PACKAGE, BUSYBOX_DEB_GLOB, cache_dir, timeout=timeout)


def fetch_busybox(cache_dir: Path | None = None) -> Path:
    """A static AArch64 busybox binary, extracted from Debian's busybox-static:arm64.

    The .deb and the extracted binary are cached in ``cache_dir`` (default
    ``<edgevirt cache>/busybox``) by file name; the binary is checked with :func:`check_elf`.
    """
    if cache_dir is None:
        from edgevirt.paths import cache_dir as default_cache

        cache_dir = default_cache() / "busybox"
    deb = download_busybox_deb(Path(cache_dir))
    out = deb.with_suffix(".busybox")
    if not out.exists():
        data = unpack.read_file(deb, BUSYBOX_PATH_IN_DEB)
        check_busybox(data, name=f"{deb}:{BUSYBOX_PATH_IN_DEB}")
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(data)
            tmp.chmod(0o755)
            os.replace(tmp, out)
        except OSError as e:
            raise ImageError(f"cannot write {out}: {e.strerror}") from e
        finally:
            tmp.unlink(missing_ok=True)
    return out


def check_busybox(source: Path | bytes, *, name: str | None = None) -> ElfInfo:
    """Busybox for the guest must be AArch64 and static (the initramfs has no libc)."""
    return check_elf(source, machine="EM_AARCH64", require_static=True, name=name)


def busybox_applets(binary: bytes) -> list[str] | None:
    """The applet names compiled into a busybox binary, read from its name table.

    Busybox keeps the sorted names as one NUL-separated string starting ``[\\0[[\\0``.
    Returns None when the table cannot be found (then nothing can be checked).
    """
    start = binary.find(b"\0[\0[[\0")
    if start < 0:
        return None
    names: list[str] = []
    for raw in binary[start + 1 : start + 1 + 16384].split(b"\0"):
        if not raw or len(raw) > 32 or not raw.isascii():
            break
        names.append(raw.decode())
    return names if len(names) > 2 and names == sorted(names) else None


# -- the archive -----------------------------------------------------------------------------

ExtraFile = bytes | Path | tuple[bytes | Path, int]


@dataclass(frozen=True)
class InitramfsInfo:
    path: Path
    size: int  # bytes written (compressed)
    entries: int
    applets: tuple[str, ...]


def _guest_path(path: str) -> str:
    if not path.startswith("/"):
        raise ImageError(f"guest path {path!r} must be absolute (start with '/')")
    return path.lstrip("/")


def _read_host(path: Path) -> tuple[bytes, int]:
    try:
        return path.read_bytes(), path.stat().st_mode & 0o7777
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e.strerror}") from e


def _extra(path: str, value: ExtraFile) -> tuple[bytes, int]:
    mode: int | None = None
    if isinstance(value, tuple):
        if len(value) != 2 or not isinstance(value[1], int):
            raise ImageError(f"extra file {path}: expected (data, mode), got {value!r:.60}")
        value, mode = value
    if isinstance(value, Path):
        data, host_mode = _read_host(value)
        return data, host_mode if mode is None else mode
    if isinstance(value, bytes | bytearray):
        return bytes(value), 0o644 if mode is None else mode
    raise ImageError(
        f"extra file {path}: expected bytes, Path or (bytes|Path, mode), got {type(value).__name__}"
    )


def _init_bytes(init_script: str | Path) -> bytes:
    if isinstance(init_script, Path):
        return _read_host(init_script)[0]
    return init_script.encode("utf-8")


def _check_init(data: bytes, writer: CpioWriter) -> None:
    """The kernel execs /init: it must be ELF or a script whose interpreter is packed."""
    if data[:4] == b"\x7fELF":
        check_elf(data, machine="EM_AARCH64", require_static=True, name="/init")
        return
    if not data.startswith(b"#!"):
        looks_like_path = b"\n" not in data and b"/" in data
        raise ImageError(
            f"/init must start with '#!' (a script) or be an ELF binary; "
            f"it starts with {data[:16]!r}",
            hint="init_script is the script text; pass a pathlib.Path to read a file"
            if looks_like_path
            else None,
        )
    line = data[2:].split(b"\n", 1)[0].strip()
    interp = line.split()[0].decode("utf-8", "replace") if line else ""
    if not interp.startswith("/"):
        raise ImageError(f"/init: interpreter {interp!r} in the '#!' line is not absolute")
    try:
        entry = writer.get(_resolve(writer, interp.lstrip("/")))
    except ImageError as e:
        raise ImageError(f"/init: bad interpreter {interp!r} in the '#!' line: {e}") from e
    if entry is None or entry.kind != "file":
        raise ImageError(f"/init: interpreter {interp} is not a file in the initramfs")


def _resolve(writer: CpioWriter, path: str, hops: int = 0) -> str:
    """Follow symlinks inside the archive (enough to check the /init interpreter)."""
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        head = "/".join(parts[:i])
        e = writer.get(head) if head else None
        if e is not None and e.kind == "symlink" and hops < 16:
            target = e.data.decode("utf-8", "surrogateescape")
            if target.startswith("/"):
                base = target.lstrip("/")
            else:
                base = "/".join([*parts[: i - 1], target])
            rest = "/".join(parts[i:])
            joined = f"{base}/{rest}" if rest else base
            return _resolve(writer, _collapse(joined), hops + 1)
    return path


def _collapse(path: str) -> str:
    out: list[str] = []
    for p in path.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if out:
                out.pop()
        else:
            out.append(p)
    return "/".join(out) or "."


def build_initramfs(
    out_path: str | os.PathLike[str],
    *,
    busybox: str | os.PathLike[str],
    init_script: str | Path,
    extra_files: Mapping[str, ExtraFile] | None = None,
    overlay_dir: str | os.PathLike[str] | None = None,
    overlays: Iterable[str | os.PathLike[str]] = (),
    applets: Iterable[str] = APPLETS,
    mtime: int | None = None,
) -> InitramfsInfo:
    """Write a gzip newc initramfs to ``out_path`` (atomically) and describe it.

    ``init_script`` is the script text (str) or a host file (Path). ``extra_files`` maps
    absolute guest paths to bytes (mode 644), a host Path (its mode), or ``(bytes|Path,
    mode)``. ``overlay_dir`` and then each of ``overlays`` is copied in as a tree. A path
    given twice with different content is an :class:`ImageError`. ``mtime`` defaults to
    ``$SOURCE_DATE_EPOCH`` or 0.
    """
    bb_data, _ = _read_host(Path(busybox))
    check_busybox(bb_data, name=str(busybox))

    wanted = list(dict.fromkeys(applets))
    known = busybox_applets(bb_data)
    if known is not None:
        missing = [a for a in wanted if a not in set(known)]
        if missing:
            log.warning("%s lacks applets %s; no links made for them", busybox, " ".join(missing))
            wanted = [a for a in wanted if a not in missing]

    w = CpioWriter(mtime=mtime)
    for d, mode in BASE_DIRS.items():
        w.add_dir(d, mode)
    for dev, kind, major, minor, mode in BASE_DEVICES:
        w.add_device(dev, "c" if kind == "c" else "b", major, minor, mode)
    w.add_file("bin/busybox", bb_data, 0o755)
    for applet in wanted:
        if "/" in applet or applet in ("busybox", "", ".", ".."):
            raise ImageError(f"bad applet name {applet!r}")
        w.add_symlink(f"bin/{applet}", "busybox")
    w.add_symlink("sbin", "bin")
    w.add_symlink("usr/bin", "../bin")
    w.add_symlink("usr/sbin", "../bin")

    init = _init_bytes(init_script)
    w.add_file("init", init, 0o755)

    for gpath, value in sorted((extra_files or {}).items()):
        data, mode = _extra(gpath, value)
        w.add_file(_guest_path(gpath), data, mode)
    for tree in [*([overlay_dir] if overlay_dir is not None else []), *overlays]:
        if not Path(tree).is_dir():
            raise ImageError(f"initramfs overlay {tree}: not a directory")
        w.add_tree(tree)

    _check_init(init, w)
    size = w.write_to(out_path, compress="gzip")
    log.info("initramfs %s: %d entries, %d bytes", out_path, len(w), size)
    return InitramfsInfo(Path(out_path), size, len(w), tuple(wanted))
