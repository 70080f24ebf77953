"""`up` over the virtio-msg transport with the back-end on the host, and the guest module.

The path itself is :func:`edgevirt.up.up` with ``transport="msg"``: the image builder's
kernel, modules (``images/modules/virtio_msg`` among them; ``/init`` loads them) and
initramfs; the composer's device tree (carve-out ``restricted-dma-pool`` + the
``edgevirt,virtio-msg`` bus node in ``ivshmem-pci`` mode, see
devicetree/bindings/edgevirt,virtio-msg.yaml); the virtio-msg back-end as ivshmem server
(it maps the carve-out file); QEMU ``virt`` with ``-device ivshmem-doorbell,vectors=2``;
the smoke suite; power-off; host checks. :func:`up_msg` is that call as a function.

What stays here is about the guest module: building it alone against the cached kernel
and checking it (:func:`build_module`, :func:`check_module`), and :func:`prepare_guest`,
the front-end's images and DTB for callers that run their own bus server (the dead
back-end test, the benchmark).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from elftools.elf.elffile import ELFFile

from edgevirt.board import load_board
from edgevirt.deploy.qemu import QemuConfig
from edgevirt.deploy.system_dt import compose_guest_dt, default_spec
from edgevirt.errors import ImageError
from edgevirt.image.build import GuestImage, build_guest_image
from edgevirt.image.kernel import KernelBuild
from edgevirt.image.modules import build_modules
from edgevirt.paths import images_dir
from edgevirt.report import Reporter
from edgevirt.up import DEVICES, UpOptions, UpResult, up

__all__ = [
    "MODULE",
    "MsgQemuConfig",
    "build_module",
    "check_module",
    "module_info",
    "prepare_guest",
    "up_msg",
]

MODULE = "virtio_msg"
#: The front-end's QEMU configuration: :class:`QemuConfig` has the ``ivshmem_socket`` of the
#: ``ivshmem-doorbell`` device itself now; the name stays for existing callers.
MsgQemuConfig = QemuConfig


# -- the guest kernel module ----------------------------------------------------------------


def module_source() -> Path:
    return images_dir() / "modules" / MODULE


def build_module(kb: KernelBuild, out: Path) -> Path:
    """Build ``virtio_msg.ko`` against ``kb``'s tree (cached by the image builder), copy it
    to ``out`` and check it."""
    built = [m for m in build_modules(kb, [module_source()]) if m.ko.name == f"{MODULE}.ko"]
    if not built:
        raise ImageError(f"module {MODULE}: the build produced no {MODULE}.ko")
    out.mkdir(parents=True, exist_ok=True)
    ko = out / f"{MODULE}.ko"
    shutil.copyfile(built[0].ko, ko)
    check_module(ko, kb.release)
    return ko


def module_info(ko: Path) -> dict[str, str]:
    """The ``.modinfo`` strings of a kernel module (vermagic, license, alias ...)."""
    with open(ko, "rb") as f:
        elf = ELFFile(f)
        sec = elf.get_section_by_name(".modinfo")
        info: dict[str, str] = {"machine": elf["e_machine"], "class": str(elf.elfclass)}
        if sec is None:
            return info
        for item in sec.data().split(b"\0"):
            key, eq, value = item.decode(errors="replace").partition("=")
            if eq and key not in info:
                info[key] = value
    return info


def check_module(ko: Path, release: str) -> dict[str, str]:
    info = module_info(ko)
    if info["machine"] != "EM_AARCH64" or info["class"] != "64":
        raise ImageError(f"{ko}: {info['machine']} ELF{info['class']}, expected AArch64 ELF64")
    magic = info.get("vermagic", "")
    if magic.split(" ")[0] != release:
        raise ImageError(f"{ko}: vermagic {magic!r} does not match kernel release {release}")
    if info.get("license") != "GPL":
        raise ImageError(f"{ko}: license {info.get('license')!r}, expected GPL")
    return info


# -- the front-end alone --------------------------------------------------------------------


def prepare_guest(
    qcfg: QemuConfig,
    build: Path,
    reporter: Reporter,
    board: str = "qemu-virt",
    devices: tuple[str, ...] = DEVICES,
) -> GuestImage:
    """Kernel, modules, initramfs (image builder) and the composed virtio-msg DTB for
    ``devices`` (in bus order), set into ``qcfg`` with a console socket;
    ``qcfg.ivshmem_socket`` is the caller's bus server."""
    b = load_board(board)
    image = build_guest_image(b, build, reporter=reporter)
    if not any(m.name == f"{MODULE}.ko" for m in image.modules):
        raise ImageError(f"the guest image has no {MODULE}.ko: {image.modules}")
    reporter.step("device tree: carve-out pool + edgevirt,virtio-msg bus node (composer)")
    spec = default_spec(b, "msg", list(devices))
    gdt = compose_guest_dt(b, qcfg, build, spec, "msg")
    qcfg.kernel, qcfg.initrd, qcfg.dtb = image.image, image.initramfs, gdt.dtb
    qcfg.console_socket = build / "console.sock"
    qcfg.console_socket.unlink(missing_ok=True)
    return image


def up_msg(
    build_dir: Path,
    *,
    board: str = "qemu-virt",
    disk_size: int = 64 << 20,
    boot_timeout: float = 120.0,
    reporter: Reporter | None = None,
) -> UpResult:
    """``edgevirt up --transport msg`` (back-end on the host) as a function."""
    opts = UpOptions(
        build_dir, board=board, transport="msg", backend="host", disk_size=disk_size,
        boot_timeout=boot_timeout,
    )  # fmt: skip
    return up(opts, reporter)
