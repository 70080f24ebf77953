"""A board's base DTB, got the way a user gets it, and cached.

``[dt] source`` in the board profile says where it comes from:

* ``qemu-dumpdtb``: QEMU writes the DTB of the exact machine (``-machine …,dumpdtb=``), with
  the board's NUMA carve-out topology. Fast (~0.3 s), so it is dumped every time.
* ``kernel:<vendor>/<name>.dtb``: built from the same Linux tree the image builder uses
  (``make ARCH=arm64 … <vendor>/<name>.dtb``, about a second) with ``DTC_FLAGS=-@`` so the
  blob carries ``__symbols__`` and overlays may target its labels, as vendor BSPs ship
  them. Cached under ``<cache>/dtb/<kernel key>/``; kernel DTBs are never committed.
* ``file:<path>``: a DTB the user gives (relative paths are relative to the board file).

Every blob is parsed with edgevirt's own checked reader (:mod:`.fdt`), so a malformed file
is a :class:`~edgevirt.errors.DeviceTreeError` naming the offset, never a traceback.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

from edgevirt.board import Board
from edgevirt.devicetree.fdt import Fdt
from edgevirt.errors import DeviceTreeError, SetupError
from edgevirt.paths import cache_dir

log = logging.getLogger(__name__)

__all__ = ["BaseDtb", "base_dtb", "kernel_dtb"]


@dataclass(frozen=True)
class BaseDtb:
    fdt: Fdt
    path: Path  # where the blob is (cache, dump or the user's file)
    origin: str  # human description: "QEMU virt dumpdtb", "Linux 6.1 renesas/…", "file …"


def base_dtb(board: Board, workdir: Path | None = None, *, refresh: bool = False) -> BaseDtb:
    """The board's base tree; ``workdir`` receives QEMU dumps (default: the cache)."""
    kind, arg = board.dt.kind, board.dt.argument
    if kind == "qemu-dumpdtb":
        return _qemu_dump(board, workdir or cache_dir() / "dtb" / "qemu")
    if kind == "kernel":
        path = kernel_dtb(arg, refresh=refresh)
        return BaseDtb(_parse(path), path, f"Linux kernel tree {arg}")
    path = Path(arg)
    if not path.is_absolute():
        path = board.path.parent / path
    if not path.is_file():
        raise DeviceTreeError(
            f"{board.where('dt')}.source: DTB file {path} does not exist",
            hint="build or copy the board's DTB there, or use source = 'kernel:<dir>/<x>.dtb'",
        )
    return BaseDtb(_parse(path), path, f"file {path}")


def _parse(path: Path) -> Fdt:
    try:
        return Fdt.from_file(path)
    except DeviceTreeError as e:
        raise DeviceTreeError(f"{path}: {e}", hint=e.hint) from None
    except OSError as e:
        raise DeviceTreeError(f"{path}: cannot read: {e.strerror}") from None


def _qemu_dump(board: Board, workdir: Path) -> BaseDtb:
    # Imported here: deploy depends on board, and only QEMU boards need it.
    from edgevirt.deploy.qemu import QemuConfig, dump_dtb

    workdir.mkdir(parents=True, exist_ok=True)
    shm = Path("/dev/shm") / f"edgevirt-dt-{os.getpid()}-{secrets.token_hex(4)}"
    out = workdir / f"{board.name}.qemu.dtb"
    try:
        dump_dtb(QemuConfig(board.qemu, shm), out)
    finally:
        shm.unlink(missing_ok=True)
    q = board.qemu
    origin = f"QEMU {q.machine} dumpdtb ({q.ram >> 20} MiB + {q.carveout >> 20} MiB carve-out)"
    return BaseDtb(_parse(out), out, origin)


def kernel_dtb(target: str, *, refresh: bool = False) -> Path:
    """Build ``target`` (e.g. ``renesas/r8a77951-salvator-xs.dtb``) in the cached kernel
    tree with symbols and copy it to the cache; later calls return the cached copy."""
    from edgevirt.image.kernel import CROSS, build_kernel

    kb = build_kernel()  # the cached build; builds it first only on a fresh machine
    cached = cache_dir() / "dtb" / kb.key / target
    if cached.exists() and not refresh:
        return cached
    src = kb.source
    dts = src / "arch/arm64/boot/dts" / target.removesuffix(".dtb")
    if not dts.with_suffix(".dts").exists():
        raise DeviceTreeError(
            f"kernel:{target}: no {dts.relative_to(src)}.dts in the Linux tree {src}"
        )
    cached.parent.mkdir(parents=True, exist_ok=True)
    # One make at a time in the shared tree (colleagues' builds, parallel tests).
    with open(cache_dir() / "dtb" / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cmd = ["make", "-s", "ARCH=arm64", f"CROSS_COMPILE={CROSS}", "DTC_FLAGS=-@", target]
        log.info("building %s in %s", target, src)
        try:
            r = subprocess.run(cmd, cwd=src, capture_output=True, text=True, timeout=300)
        except FileNotFoundError:
            raise SetupError("make not found", hint="run `make setup`") from None
        if r.returncode != 0:
            raise DeviceTreeError(
                f"kernel:{target}: make failed (exit {r.returncode}): "
                + " | ".join(r.stderr.strip().splitlines()[-5:])
            )
        built = src / "arch/arm64/boot/dts" / target
        tmp = cached.with_suffix(".tmp")
        tmp.write_bytes(built.read_bytes())
        tmp.replace(cached)
    return cached
