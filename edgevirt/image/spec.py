"""The ``[image]`` section of a system spec: what the image builder adds to the defaults.

The system spec (VMs, carve-out, devices) is parsed elsewhere; this module reads only its
``[image]`` table, so each layer owns its schema. Paths are relative to the spec file.
Without a spec, or without an ``[image]`` section, the defaults are edgevirt's own kernel
fragments and modules, busybox, ``/init`` and the agent::

    [image]
    fragments = ["extra.config"]        # after images/kernel/*.config, in this order
    modules = ["drivers/my_mod"]        # after images/modules/* (each dir has a Kbuild)
    edgevirt_modules = true             # false: skip images/modules/*
    overlays = ["rootfs"]               # directory trees copied into the initramfs
    dtb = "board.dtb"                   # the fdt for the FIT (default: composed for QEMU)

    [image.kernel]                      # default: source = "debian" (linux-source-6.1)
    source = "tarball"                  # debian | tarball | tree | prebuilt
    path = "linux-6.1.tar.xz"           # prebuilt: the Image
    vmlinux = "vmlinux"                 # prebuilt only, optional

    [image.files]                       # guest path = host path, or { path, mode }
    "/etc/motd" = "motd.txt"
    "/bin/tool" = { path = "tool", mode = 0o755 }

    [image.fit]                         # U-Boot addresses (a board may set them too)
    kernel_load = 0x40400000
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgevirt.errors import ConfigError
from edgevirt.image.kernel import KernelSource

_KEYS = {"fragments", "modules", "edgevirt_modules", "overlays", "dtb", "kernel", "files", "fit"}


@dataclass(frozen=True)
class ExtraFile:
    host: Path
    mode: int | None = None  # None: the host file's mode


@dataclass(frozen=True)
class ImageSpec:
    path: Path | None = None
    sha256: str | None = None  # of the spec file
    kernel: KernelSource = field(default_factory=KernelSource)
    fragments: tuple[Path, ...] = ()
    modules: tuple[Path, ...] = ()
    edgevirt_modules: bool = True
    overlays: tuple[Path, ...] = ()
    files: dict[str, ExtraFile] = field(default_factory=dict)
    dtb: Path | None = None
    fit: dict[str, Any] = field(default_factory=dict)


def _path(base: Path, value: Any, where: str, *, kind: str = "any") -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a path string, got {value!r}")
    p = (base / value).resolve()
    if not p.exists():
        raise ConfigError(f"{where}: {value!r} does not exist ({p})")
    if kind == "file" and not p.is_file():
        raise ConfigError(f"{where}: {p} is not a file")
    if kind == "dir" and not p.is_dir():
        raise ConfigError(f"{where}: {p} is not a directory")
    return p


def _paths(base: Path, table: dict[str, Any], key: str, where: str, kind: str) -> tuple[Path, ...]:
    value = table.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(f"{where}.{key}: expected a list of paths, got {value!r}")
    return tuple(_path(base, v, f"{where}.{key}[{i}]", kind=kind) for i, v in enumerate(value))


def _kernel(base: Path, table: Any, where: str) -> KernelSource:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table, got {table!r}")
    unknown = set(table) - {"source", "path", "vmlinux"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    kind = table.get("source", "debian")
    if kind not in ("debian", "tarball", "tree", "prebuilt"):
        raise ConfigError(f"{where}.source: {kind!r} is not debian/tarball/tree/prebuilt")
    if kind == "debian":
        if "path" in table or "vmlinux" in table:
            raise ConfigError(f"{where}: source = 'debian' takes no path")
        return KernelSource()
    if "path" not in table:
        raise ConfigError(f"{where}: source = {kind!r} needs a path")
    path = _path(base, table["path"], f"{where}.path", kind="dir" if kind == "tree" else "file")
    vmlinux = None
    if "vmlinux" in table:
        if kind != "prebuilt":
            raise ConfigError(f"{where}.vmlinux: only for source = 'prebuilt'")
        vmlinux = _path(base, table["vmlinux"], f"{where}.vmlinux", kind="file")
    return KernelSource(kind, path, vmlinux)


def _files(base: Path, table: Any, where: str) -> dict[str, ExtraFile]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table of guest path = host path")
    out: dict[str, ExtraFile] = {}
    for guest, value in table.items():
        w = f"{where}.{guest!r}"
        if not guest.startswith("/") or guest.rstrip("/") == "":
            raise ConfigError(f"{w}: guest path must be absolute, like /etc/motd")
        if isinstance(value, dict):
            if set(value) - {"path", "mode"} or "path" not in value:
                raise ConfigError(f"{w}: expected {{ path = ..., mode = 0o644 }}, got {value!r}")
            mode = value.get("mode")
            if mode is not None and (not isinstance(mode, int) or not 0 <= mode <= 0o7777):
                raise ConfigError(f"{w}.mode: expected a mode like 0o755, got {mode!r}")
            out[guest] = ExtraFile(_path(base, value["path"], f"{w}.path", kind="file"), mode)
        else:
            out[guest] = ExtraFile(_path(base, value, w, kind="file"))
    return out


def parse_image_section(data: dict[str, Any], base: Path, where: str) -> ImageSpec:
    """Validate the ``[image]`` table of a parsed document; ``where`` names the file."""
    table = data.get("image", {})
    w = f"{where}: [image]"
    if not isinstance(table, dict):
        raise ConfigError(f"{w}: expected a table")
    unknown = set(table) - _KEYS
    if unknown:
        raise ConfigError(
            f"{w}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(_KEYS))})"
        )
    em = table.get("edgevirt_modules", True)
    if not isinstance(em, bool):
        raise ConfigError(f"{w}.edgevirt_modules: expected true/false, got {em!r}")
    fit = table.get("fit", {})
    if not isinstance(fit, dict):
        raise ConfigError(f"{w}.fit: expected a table")
    return ImageSpec(
        kernel=_kernel(base, table.get("kernel", {}), f"{w}.kernel"),
        fragments=_paths(base, table, "fragments", w, "file"),
        modules=_paths(base, table, "modules", w, "dir"),
        edgevirt_modules=em,
        overlays=_paths(base, table, "overlays", w, "dir"),
        files=_files(base, table.get("files", {}), f"{w}.files"),
        dtb=_path(base, table["dtb"], f"{w}.dtb", kind="file") if "dtb" in table else None,
        fit=fit,
    )


def load_image_spec(path: Path | None) -> ImageSpec:
    """The ``[image]`` section of the spec at ``path``; defaults when ``path`` is None."""
    if path is None:
        return ImageSpec()
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"spec {path}: {e.strerror}") from e
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from e
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to parse") from None
    spec = parse_image_section(data, path.resolve().parent, str(path))
    return replace(spec, path=path, sha256=hashlib.sha256(raw).hexdigest())
