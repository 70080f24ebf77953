"""The service-VM root filesystem: busybox, Debian's arm64 Python 3.11, edgevirt, a helper.

An initramfs (uncompressed newc cpio: nothing to inflate under TCG at boot) laid out like a
merged-/usr Debian system, so Debian's binaries find what they expect::

    /bin/busybox + applets      the shell and tools (static busybox, as in the guest image)
    /lib -> usr/lib             merged /usr: the dynamic loader /lib/ld-linux-aarch64.so.1
    /usr/bin/python3.11         from python3.11-minimal:arm64 (+ python3 -> python3.11)
    /usr/lib/python3.11/...     the standard library (tests, GUIs, installers left out) with
                                .pyc compiled on the host (3.11 bytecode is portable)
    /usr/lib/aarch64-linux-gnu  the shared libraries of the closure (see python_cross)
    /usr/lib/python3/dist-packages/edgevirt
                                the parts of edgevirt the back-end imports, and
                                ``_ring.cpython-311-aarch64-linux-gnu.so`` cross-compiled
    /usr/lib/modules/*.ko       kernel helpers loaded by /init (ev_ivshmem)
    /etc/edgevirt/service.json  the back-end's configuration
    /init, /bin/edgevirt-agent  boot script and the console agent

The image is cached under ``<cache>/servicevm/image-<key>``; the key hashes every input:
package names and versions, the extension's sources, every edgevirt file shipped, the init
script, agent, helper modules, busybox and the configuration.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgevirt.errors import ImageError
from edgevirt.image import python_cross as pc
from edgevirt.image.cpio import CpioWriter
from edgevirt.image.initramfs import (
    APPLETS,
    BASE_DEVICES,
    busybox_applets,
    check_busybox,
    fetch_busybox,
)
from edgevirt.paths import PROJECT_ROOT, cache_dir

log = logging.getLogger(__name__)

SITE = "usr/lib/python3/dist-packages"
EXTENSION = "edgevirt.backend.virtq._ring"
#: What of edgevirt the service VM runs: the back-end and the peer entry point.
PACKAGE_PARTS: tuple[str, ...] = (
    "edgevirt/__init__.py",
    "edgevirt/errors.py",
    "edgevirt/devpeer.py",
    "edgevirt/backend",
    "edgevirt/servicevm/__init__.py",
    "edgevirt/servicevm/peer.py",
    "edgevirt/servicevm/peripherals.py",
)
DIRS: dict[str, int] = {
    "bin": 0o755, "dev": 0o755, "etc": 0o755, "mnt": 0o755, "proc": 0o555, "root": 0o700,
    "run": 0o755, "sys": 0o555, "tmp": 0o1777, "usr": 0o755, "usr/bin": 0o755,
    "usr/lib": 0o755, "var": 0o755,
}  # fmt: skip


@dataclass(frozen=True)
class ServiceRootfs:
    path: Path  # the cpio archive
    key: str
    manifest: dict

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def _edgevirt_files() -> list[tuple[str, Path]]:
    """(path inside the package tree, host file) for every shipped edgevirt source."""
    out: list[tuple[str, Path]] = []
    for part in PACKAGE_PARTS:
        p = PROJECT_ROOT / part
        if p.is_file():
            out.append((part, p))
        elif p.is_dir():
            out += [
                (f.relative_to(PROJECT_ROOT).as_posix(), f)
                for f in sorted(p.rglob("*.py"))
                if "__pycache__" not in f.parts
            ]
        else:
            raise ImageError(f"service-VM image: {p} is missing")
    return out


def _guest(path: str) -> str:
    """A .deb path in the merged-/usr layout (``/lib/x`` → ``usr/lib/x``)."""
    rel = path.lstrip("/")
    top, _, rest = rel.partition("/")
    if top in ("lib", "lib64", "bin", "sbin"):
        return f"usr/{top}" + (f"/{rest}" if rest else "")
    return rel


def build_service_rootfs(
    *,
    modules: Sequence[Path],
    init_script: Path,
    agent: Path,
    config: Mapping[str, object],
    busybox: Path | None = None,
    cache: Path | None = None,
) -> ServiceRootfs:
    """Build (or reuse) the service-VM initramfs; see the module docstring for the layout."""
    cache = cache or cache_dir() / "servicevm"
    names = pc.resolve_closure()
    debs = pc.download([*names, f"{pc.DEV_PACKAGE}:{pc.ARCH}"], cache / "debs")
    runtime, dev = debs[:-1], debs[-1]
    sources = pc.extension_sources(PROJECT_ROOT / "setup.py", EXTENSION)
    ext_deps = sorted({*sources, *sources[0].parent.glob("*.h")})
    files = _edgevirt_files()
    busybox = busybox or fetch_busybox()
    config_bytes = json.dumps(config, indent=2, sort_keys=True).encode() + b"\n"
    key = pc.digest(
        [
            "servicevm-rootfs-1",
            sys.version.split()[0],  # the .pyc are this interpreter's
            *(f"{d.name}={d.version}" for d in debs),
            *(p.read_bytes() for p in ext_deps),
            *(f"{rel}\0" for rel, _ in files),
            *(p.read_bytes() for _, p in files),
            init_script.read_bytes(),
            agent.read_bytes(),
            *(m.read_bytes() for m in modules),
            busybox.read_bytes(),
            config_bytes,
        ]
    )
    out = cache / f"image-{key}"
    archive = out / "rootfs.cpio"
    if (out / "manifest.json").exists() and archive.exists():
        manifest = json.loads((out / "manifest.json").read_text())
        return ServiceRootfs(archive, key, manifest)

    tmp = cache / f".image-{key}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        suffix = pc.ext_suffix(runtime)
        include = pc.python_headers(dev, cache / f"headers-{dev.version}")
        so = tmp / f"_ring{suffix}"
        elf = pc.cross_compile_extension(sources, include, so)
        w = CpioWriter(mtime=0)
        counts = _add_base(w, busybox, init_script, agent)
        counts["python_files"] = _add_debs(w, runtime)
        counts["edgevirt_files"] = _add_edgevirt(w, files, so, suffix)
        for m in modules:
            w.add_file(f"usr/lib/modules/{m.name}", m.read_bytes(), 0o644)
        w.add_file("etc/edgevirt/service.json", config_bytes, 0o644)
        w.write_to(tmp / "rootfs.cpio", compress=None)
        manifest = {
            "key": key,
            "packages": {d.name: d.version for d in runtime},
            "headers": f"{dev.name}={dev.version}",
            "extension": {
                "path": f"/{SITE}/edgevirt/backend/virtq/_ring{suffix}",
                "machine": elf.machine,
                "class": elf.elfclass,
                "type": elf.type,
                "sources": [s.name for s in sources],
            },  # fmt: skip
            "modules": [m.name for m in modules],
            "entries": len(w),
            "bytes": (tmp / "rootfs.cpio").stat().st_size,
            "config": config,
            **counts,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("service-VM rootfs %s: %d bytes", archive, manifest["bytes"])
    return ServiceRootfs(archive, key, manifest)


def _add_base(w: CpioWriter, busybox: Path, init_script: Path, agent: Path) -> dict[str, int]:
    for d, mode in DIRS.items():
        w.add_dir(d, mode)
    for dev, kind, major, minor, mode in BASE_DEVICES:
        w.add_device(dev, "c" if kind == "c" else "b", major, minor, mode)
    bb = busybox.read_bytes()
    check_busybox(bb, name=str(busybox))
    known = set(busybox_applets(bb) or APPLETS)
    w.add_file("bin/busybox", bb, 0o755)
    applets = [a for a in APPLETS if a in known]
    for a in applets:
        w.add_symlink(f"bin/{a}", "busybox")
    w.add_symlink("sbin", "bin")
    w.add_symlink("lib", "usr/lib")
    init = init_script.read_bytes()
    if not init.startswith(b"#!/bin/sh"):
        raise ImageError(f"{init_script}: the service VM's /init must be a /bin/sh script")
    w.add_file("init", init, 0o755)
    w.add_file("bin/edgevirt-agent", agent.read_bytes(), 0o755)
    return {"applets": len(applets)}


def _add_debs(w: CpioWriter, debs: Sequence[pc.DebPackage]) -> int:
    n = 0
    for pkg, m in pc.members(debs):
        path = _guest(m.path)
        if not path:
            continue
        try:
            if m.type == "dir":
                if w.get(path) is None:
                    w.add_dir(path, m.mode or 0o755)
            elif m.type == "symlink":
                w.add_symlink(path, m.linkname)
            elif m.type == "file":
                w.add_file(path, m.data, m.mode)
                n += 1
                if path.endswith(".py") and "/python3" in path:
                    code = pc.pyc(m.data, "/" + path)
                    if code is not None:
                        w.add_file(pc.pyc_path(path), code, 0o644)
        except ImageError as e:
            raise ImageError(f"{pkg.deb.name}: {m.path}: {e}") from e
    w.add_symlink("usr/bin/python3", "python3.11")
    return n


def _add_edgevirt(w: CpioWriter, files: Sequence[tuple[str, Path]], so: Path, suffix: str) -> int:
    for rel, host in files:
        data = host.read_bytes()
        w.add_file(f"{SITE}/{rel}", data, 0o644)
        code = pc.pyc(data, f"/{SITE}/{rel}")
        if code is not None:
            w.add_file(pc.pyc_path(f"{SITE}/{rel}"), code, 0o644)
    w.add_file(f"{SITE}/edgevirt/backend/virtq/_ring{suffix}", so.read_bytes(), 0o644)
    meta = "Metadata-Version: 2.1\nName: edgevirt\nVersion: 0.1.0\n"
    w.add_file(f"{SITE}/edgevirt-0.1.0.dist-info/METADATA", meta.encode(), 0o644)
    return len(files) + 1
