"""The image builder: kernel → modules → initramfs → FIT → manifest, each step verified.

:func:`build_guest_image` is what ``edgevirt image build`` and ``edgevirt up`` call. Its
outputs land in the build directory with fixed names::

    Image  kernel.config  modules/*.ko  initramfs.cpio.gz  [guest.dtb  guest.itb guest.its]
    manifest.json

``manifest.json`` lists every artefact (size, sha256) and every input (kernel source and
fragments, packages, module sources, /init, agent, overlays, extra files, board and spec),
with paths relative to the project or build directory, so the same inputs give the same
bytes in any build directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgevirt.board import Board, load_board
from edgevirt.errors import ConfigError, SetupError
from edgevirt.image import initramfs as initramfs_mod
from edgevirt.image.cpio import source_date_epoch
from edgevirt.image.deb import DebArchive
from edgevirt.image.fit import FitLayout, build_fit
from edgevirt.image.guest_tools import build_guest_tools
from edgevirt.image.kernel import (
    KernelBuild,
    build_kernel,
    default_fragments,
    file_sha256,
    key_inputs,
    pkg_version,
)
from edgevirt.image.modules import BuiltModule, build_modules, discover
from edgevirt.image.spec import ImageSpec, load_image_spec
from edgevirt.image.verify import verify_image, verify_initramfs, verify_vmlinux
from edgevirt.paths import PROJECT_ROOT, images_dir
from edgevirt.report import Reporter

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "edgevirt-image-manifest/1"
INIT = "initramfs/init"
AGENT = "initramfs/edgevirt-agent"
PACKAGES = ("linux-source-6.1", "gcc-aarch64-linux-gnu", "u-boot-tools")


@dataclass
class GuestImage:
    """What a build produced; every path is inside ``dir`` except ``vmlinux`` (cache)."""

    board: str
    dir: Path
    kernel: KernelBuild
    release: str
    image: Path
    config: Path | None
    vmlinux: Path | None
    initramfs: Path
    modules: list[Path] = field(default_factory=list)
    dtb: Path | None = None
    fit: Path | None = None
    manifest: Path | None = None


def _rel(path: Path) -> str:
    """Project-relative when inside the project: manifests must not depend on the checkout."""
    p = path.resolve()
    try:
        return str(p.relative_to(PROJECT_ROOT))
    except ValueError:
        return str(p)


def _artefact(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def tree_digest(root: Path) -> str:
    """Content hash of a directory tree (paths, modes, link targets, bytes)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        h.update(f"{p.relative_to(root)}\0{st.st_mode:o}\0".encode())
        if p.is_symlink():
            h.update(os.readlink(p).encode())
        elif p.is_file():
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _fit_layout(board: Board, spec: ImageSpec) -> FitLayout:
    """The board's U-Boot ``kernel_addr_r`` (``[bootloader]``), overridden by ``[image.fit]``."""
    table: dict[str, Any] = {"description": f"edgevirt guest for {board.name}"}
    loader = getattr(board, "bootloader", None)  # real boards; QEMU virt uses the default
    if loader is not None:
        table["kernel_load"] = loader.kernel_addr_r
    table.update(spec.fit)
    return FitLayout.from_table(table, f"{spec.path}: [image.fit]")


def _busybox_version(busybox: Path) -> str:
    deb = busybox.with_suffix(".deb")
    return DebArchive(deb).control().get("Version", "?") if deb.exists() else "?"


def _packages() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = pkg_version(pkg)
        except SetupError:
            out[pkg] = "not installed"
    return out


def build_guest_image(
    board: Board | str,
    build_dir: Path,
    *,
    spec: ImageSpec | Path | None = None,
    reporter: Reporter | None = None,
    dtb: Path | None = None,
    rebuild: bool = False,
) -> GuestImage:
    """Build (or reuse from the cache) everything a guest boots from, verified, + manifest.

    ``dtb`` (or the spec's ``[image] dtb``) adds a FIT with kernel, ramdisk and fdt.
    ``rebuild`` forces the kernel build even when the cache has it.
    """
    reporter = reporter or Reporter()
    b = load_board(board) if isinstance(board, str) else board
    ispec = spec if isinstance(spec, ImageSpec) else load_image_spec(spec)
    out = build_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    epoch = source_date_epoch()

    # -- kernel
    frags = [*default_fragments(), *ispec.fragments]
    reporter.step(f"kernel: {ispec.kernel.describe()} + {len(frags)} fragment(s)")
    kb = build_kernel(
        fragments=frags,
        source=ispec.kernel,
        force=rebuild,
        progress=reporter.progress,
        on_wait=reporter.step,
    )
    release = kb.release
    verify_image(kb.image)
    vmlinux = kb.vmlinux if kb.vmlinux.exists() else None
    if vmlinux is not None:
        verify_vmlinux(vmlinux, release=release)
    image = out / "Image"
    shutil.copyfile(kb.image, image)
    config = None
    if kb.config.exists():
        config = out / "kernel.config"
        shutil.copyfile(kb.config, config)

    # -- modules
    mod_dirs = discover(ispec.modules)
    if not ispec.edgevirt_modules:
        mod_dirs = [d for d in mod_dirs if d.parent != images_dir() / "modules"]
    if not kb.has_tree and not ispec.modules:
        mod_dirs = []  # a prebuilt kernel: edgevirt's own modules are optional
    reporter.step(f"modules: {', '.join(d.name for d in mod_dirs) or 'none'}")
    built: list[BuiltModule] = build_modules(kb, mod_dirs, progress=reporter.progress)
    mod_out = out / "modules"
    shutil.rmtree(mod_out, ignore_errors=True)
    mod_paths = []
    if built:
        mod_out.mkdir()
        for m in built:
            dest = mod_out / m.ko.name
            if dest.exists():
                raise ConfigError(f"two modules build {m.ko.name}: rename one")
            shutil.copyfile(m.ko, dest)
            mod_paths.append(dest)

    # -- initramfs
    reporter.step("initramfs: busybox (arm64) + /init + agent + modules + overlays")
    busybox = initramfs_mod.fetch_busybox()
    init, agent = images_dir() / INIT, images_dir() / AGENT
    extra: dict[str, initramfs_mod.ExtraFile] = {"/bin/edgevirt-agent": (agent, 0o755)}
    extra.update(build_guest_tools(out / "guest-tools"))
    for p in mod_paths:
        extra[f"/lib/modules/{p.name}"] = (p, 0o644)
    for guest, f in ispec.files.items():
        if guest in extra:
            raise ConfigError(f"{ispec.path}: [image.files] {guest!r} would replace edgevirt's")
        extra[guest] = f.host if f.mode is None else (f.host, f.mode)
    initrd = out / "initramfs.cpio.gz"
    initramfs_mod.build_initramfs(
        initrd,
        busybox=busybox,
        init_script=init,
        extra_files=extra,
        overlays=ispec.overlays,
        mtime=epoch,
    )
    verify_initramfs(initrd, release=release)

    # -- FIT
    fdt = dtb or ispec.dtb
    fit = dtb_out = None
    if fdt is not None:
        reporter.step("FIT: kernel + ramdisk + fdt (sha256) with mkimage")
        dtb_out = out / "guest.dtb"
        if fdt.resolve() != dtb_out:
            shutil.copyfile(fdt, dtb_out)
        fit = build_fit(
            out / "guest.itb",
            kernel=image,
            ramdisk=initrd,
            fdt=dtb_out,
            layout=_fit_layout(b, ispec),
            release=release,
            epoch=epoch,
        )

    result = GuestImage(
        b.name, out, kb, release, image, config, vmlinux, initrd, mod_paths, dtb_out, fit
    )
    result.manifest = write_manifest(result, b, ispec, busybox, built, frags, epoch)
    reporter.step(f"manifest: {result.manifest}")
    return result


def write_manifest(
    img: GuestImage,
    board: Board,
    spec: ImageSpec,
    busybox: Path,
    built: list[BuiltModule],
    frags: list[Path],
    epoch: int,
) -> Path:
    arts = [img.image, img.config, *img.modules, img.initramfs, img.dtb, img.fit]
    artefacts = {
        str(p.relative_to(img.dir)): _artefact(p) for p in arts if p is not None
    }  # fmt: skip
    if img.fit is not None:
        its = img.fit.with_suffix(".its")
        artefacts[its.name] = _artefact(its)
    kernel_inputs: dict[str, Any]
    if img.kernel.has_tree:
        kernel_inputs = key_inputs(frags, spec.kernel)
    else:
        kernel_inputs = {"prebuilt": img.kernel.key}
    manifest = {
        "format": MANIFEST_FORMAT,
        "board": board.name,
        "kernel": {"release": img.release, "cache_key": img.kernel.key},
        "artefacts": artefacts,
        "inputs": {
            "board": {"file": _rel(board.path), "sha256": file_sha256(board.path)},
            "spec": (
                {"file": _rel(spec.path), "sha256": spec.sha256} if spec.path is not None else None
            ),
            "kernel": {
                **kernel_inputs,
                "source": spec.kernel.describe(),
                "fragments": [{"file": _rel(f), "sha256": file_sha256(f)} for f in frags],
            },
            "packages": {**_packages(), "busybox-static:arm64": _busybox_version(busybox)},
            "initramfs": {
                "busybox": file_sha256(busybox),
                "init": file_sha256(images_dir() / INIT),
                "edgevirt-agent": file_sha256(images_dir() / AGENT),
                "files": {g: file_sha256(f.host) for g, f in sorted(spec.files.items())},
                "overlays": [{"dir": _rel(o), "sha256": tree_digest(o)} for o in spec.overlays],
            },
            "modules": [
                {
                    "name": m.name,
                    "ko": m.ko.name,
                    "source_sha256": m.source_sha256,
                    "vermagic": m.info.vermagic,
                }
                for m in built
            ],
            "source_date_epoch": epoch,
        },
    }
    path = img.dir / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path
