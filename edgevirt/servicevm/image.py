"""The service VM's image: the guest kernel (same cached build), ev_ivshmem, the rootfs.

The kernel needs nothing beyond the front-end's configuration (PCI, PCI_MSI, GICv2m,
MODULES): MSI-X reaches user space through the small ``ev_ivshmem`` module, built like any
out-of-tree module against the cached tree, so no kernel option (UIO, VFIO) is added.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgevirt.image.kernel import KernelBuild, build_kernel
from edgevirt.image.modules import BuiltModule, build_modules
from edgevirt.image.rootfs import ServiceRootfs, build_service_rootfs
from edgevirt.paths import images_dir
from edgevirt.report import Reporter
from edgevirt.servicevm.peer import PeerConfig


@dataclass(frozen=True)
class ServiceImage:
    kernel: KernelBuild
    modules: list[BuiltModule]
    rootfs: ServiceRootfs


def helper_dirs() -> list[Path]:
    return sorted(p for p in (images_dir() / "servicevm" / "modules").iterdir() if p.is_dir())


def build_service_image(config: PeerConfig, reporter: Reporter | None = None) -> ServiceImage:
    """Kernel (cached), helper modules (cached), rootfs with ``config`` baked in (cached)."""
    reporter = reporter or Reporter()
    kb = build_kernel(progress=reporter.progress)
    mods = build_modules(kb, helper_dirs())
    src = images_dir()
    rootfs = build_service_rootfs(
        modules=[m.ko for m in mods],
        init_script=src / "servicevm" / "init",
        agent=src / "initramfs" / "edgevirt-agent",
        config=config.to_json(),
    )
    return ServiceImage(kb, mods, rootfs)
