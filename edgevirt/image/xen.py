"""The Xen hypervisor binary, taken out of Debian's ``xen-hypervisor-4.17-arm64`` .deb.

Nothing is installed on the host: ``apt-get download`` fetches the arm64 package (the arm64
dpkg architecture must be enabled, ``scripts/setup-host.sh`` does it), edgevirt's own .deb
reader (:mod:`edgevirt.image.deb`) takes ``/boot/xen-<ver>-arm64`` and its build config out
of it, and both are cached under ``<cache>/xen`` by the .deb's file name. The binary is an
arm64 ``Image`` (the ``ARM\\x64`` magic at offset 56), which QEMU loads with ``-kernel`` and
U-Boot boots with ``booti``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from edgevirt.errors import ImageError, SetupError
from edgevirt.image import initramfs, unpack
from edgevirt.image.deb import DebArchive

log = logging.getLogger(__name__)

XEN_PACKAGE = "xen-hypervisor-4.17-arm64:arm64"
XEN_DEB_GLOB = "xen-hypervisor-4.17-arm64_*_arm64.deb"
APT_HINT = initramfs.APT_HINT
#: arm64 Image header: "ARM\x64" at offset 56 (Documentation/arm64/booting.rst).
IMAGE_MAGIC = b"ARM\x64"
#: Options the dom0less platform relies on, and ones it must not assume.
NEEDED_CONFIG = ("CONFIG_ARM_64=y", "CONFIG_GICV3=y")


@dataclass(frozen=True)
class XenBinary:
    image: Path
    config: Path
    version: str
    deb: Path

    def has(self, option: str) -> bool:
        """``option`` (``CONFIG_X``) is ``=y`` in the binary's build config."""
        return f"{option}=y" in self.config.read_text().splitlines()


def download_deb(package: str, glob: str, cache_dir: Path, *, timeout: float = 300) -> Path:
    """The shared ``apt-get download`` (:func:`edgevirt.image.initramfs.download_deb`); a
    missing Xen package is the host's problem here (SetupError, exit 3)."""
    return initramfs.download_deb(package, glob, cache_dir, timeout=timeout, error=SetupError)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        raise ImageError(f"cannot write {path}: {e.strerror}") from e
    finally:
        tmp.unlink(missing_ok=True)


def extract_xen(deb: Path, out_dir: Path) -> XenBinary:
    """``/boot/xen-*-arm64`` and its ``.config`` out of ``deb`` into ``out_dir`` (cached)."""
    arc = DebArchive(deb)
    version = arc.control().get("Version", "?")
    # members through the unpacking rules (edgevirt.image.unpack), like every .deb
    names = [m.path for m in unpack.deb_members(deb) if m.path.startswith("/boot/xen-")]
    image_name = next((n for n in names if n.endswith("-arm64")), None)
    config_name = next((n for n in names if n.endswith("-arm64.config")), None)
    if image_name is None or config_name is None:
        raise ImageError(f"{deb}: no /boot/xen-*-arm64 (+ .config) in data.tar: {names}")
    out_dir.mkdir(parents=True, exist_ok=True)
    image = out_dir / Path(image_name).name
    config = out_dir / Path(config_name).name
    if not image.exists() or not config.exists():
        data = unpack.read_file(deb, image_name)
        if len(data) < 64 or data[56:60] != IMAGE_MAGIC:
            raise ImageError(f"{deb}:{image_name}: not an arm64 Image (no ARM\\x64 magic at 56)")
        _write_atomic(config, unpack.read_file(deb, config_name))
        _write_atomic(image, data)
    xen = XenBinary(image, config, version, deb)
    missing = [o for o in NEEDED_CONFIG if o not in config.read_text().splitlines()]
    if missing:
        raise ImageError(f"{config}: this Xen lacks {', '.join(missing)}")
    return xen


def fetch_xen(cache_dir: Path | None = None) -> XenBinary:
    """Debian's Xen 4.17 for arm64 (download once, then from the cache)."""
    if cache_dir is None:
        from edgevirt.paths import cache_dir as default_cache

        cache_dir = default_cache() / "xen"
    deb = download_deb(XEN_PACKAGE, XEN_DEB_GLOB, cache_dir)
    return extract_xen(deb, cache_dir / deb.stem)
