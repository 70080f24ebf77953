"""A QEMU virt target with edgevirt's guest: its images, its back-end, its power.

:meth:`QemuMachine.prepare` gets kernel, modules and initramfs from the image builder
(:func:`~edgevirt.image.build.build_guest_image`, or ``--image DIR``), the carve-out DTB
for this exact topology, and a FIT when U-Boot wants one. As a
:class:`~edgevirt.deploy.power.Power`, ``on`` starts the back-end on the host and QEMU
(console on a unix socket that waits for us), ``off`` stops both, and ``check`` raises as
soon as either has died or the back-end has refused the guest.

Transports: ``vhost-user`` (one ``vhost-user-*`` device per back-end device on virt's
virtio-mmio bus, chardevs with ``reconnect=1``) or ``msg`` (an ``ivshmem-doorbell`` device
whose server is the virtio-msg back-end, or an external server such as the service VM's
host side, :class:`ExternalBus`: then the machine starts no back-end).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from edgevirt.board import Board
from edgevirt.console.ser2net import Ser2net
from edgevirt.deploy.backend_process import BackendProcess, IvshmemBus, backend_socket
from edgevirt.deploy.power import Power
from edgevirt.deploy.qemu import (
    QemuConfig,
    QemuProcess,
    VhostUserDevice,
    dump_dtb,
    virtio_mmio_slots,
    wait_for_path,
)
from edgevirt.deploy.qmp import Qmp
from edgevirt.devicetree import compose as dtcompose
from edgevirt.devicetree.fdt import Fdt
from edgevirt.devsmoke import DeviceSmoke, device_smoke, supported
from edgevirt.errors import ConfigError, DeployError
from edgevirt.report import Reporter
from edgevirt.spec import SystemSpec

if TYPE_CHECKING:
    from edgevirt.image.build import GuestImage

log = logging.getLogger(__name__)

#: The back-end devices every edgevirt QEMU guest gets (the smoke suite checks them).
DEVICES = [("blk", "vhost-user-blk"), ("rng", "vhost-user-rng")]
VHOST_USER_KINDS = dict(DEVICES)
TRANSPORTS = ("vhost-user", "msg")
#: QEMU reconnects a vhost-user chardev to a restarted back-end after this many seconds.
RECONNECT = {"reconnect": "1"}
#: The devices whose QEMU 7.2 front-end survives ``reconnect``: vhost-user-blk waits for the
#: connection before its first message; vhost-user-rng does not, and with ``reconnect`` its
#: realize fails ("Failed to set msg fds") and QEMU aborts in error_setv().
RECONNECTS = {"vhost-user-blk"}


@dataclass(frozen=True)
class ExternalBus:
    """A virtio-msg bus served outside this machine: the carve-out file and the ivshmem
    socket belong to someone else (the service VM's host side)."""

    carveout_file: Path
    ivshmem_socket: Path


@dataclass
class Images:
    kernel: Path
    initrd: Path
    dtb: Path
    fit: Path | None = None
    #: DT paths of the virtio-mmio nodes the carve-out serves.
    nodes: list[str] = field(default_factory=list)
    #: Real boards: the composed restricted-dma-pool (base, size), if the DTB has one.
    carveout: tuple[int, int] | None = None
    #: Boards that boot from a card: the SD-card image (edgevirt.image.sdcard).
    sdcard: Path | None = None


def compose_dtb(
    board: Board, qcfg: QemuConfig, build: Path, restrict: bool, nodes: list[str]
) -> Path:
    """Dump virt's DTB for this topology; overlay the carve-out onto the nodes in use."""
    raw = dump_dtb(qcfg, build / "qemu-virt.raw.dtb")
    base = Fdt.from_bytes(raw)
    if not restrict:
        out = build / "guest.dtb"
        out.write_bytes(base.to_bytes())  # compacted: a padded DTB hangs the boot
        return out
    q = board.qemu
    overlay = dtcompose.compose_carveout(base, q.carveout_base, q.carveout, nodes)
    paths = dtcompose.write_outputs(base, overlay, build, "guest")
    return Path(paths["dtb"])


def mmio_nodes(count: int) -> list[str]:
    """DT paths of the virtio-mmio nodes QEMU gives the first ``count`` devices."""
    return [f"/virtio_mmio@{a:x}" for a in virtio_mmio_slots(count)]


def carveout_dtb(board: Board, build: Path, devices: int = 2) -> tuple[Path, list[str]]:
    """The carve-out DTB ``up`` boots on a QEMU board with ``devices`` vhost-user devices,
    composed outside a run (QEMU's carve-out file is a throwaway); and the nodes it serves."""
    shm = Path("/dev/shm") / f"edgevirt-dt-{os.getpid()}-{secrets.token_hex(4)}"
    nodes = mmio_nodes(devices)
    try:
        return compose_dtb(board, QemuConfig(board.qemu, shm), build, True, nodes), nodes
    finally:
        shm.unlink(missing_ok=True)


class QemuMachine(Power):
    def __init__(
        self,
        board: Board,
        build: Path,
        *,
        firmware: Path | None = None,
        firmware_ram: int = 0,
        tftp: bool = False,
        disk_size: int = 64 << 20,
        ser2net: bool = False,
        transport: str = "vhost-user",
        spec: SystemSpec | None = None,
        external: ExternalBus | None = None,
        console_device: Path | None = None,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ConfigError(f"transport {transport!r}: expected one of {', '.join(TRANSPORTS)}")
        if external is not None and transport != "msg":
            raise ConfigError("an external back-end needs transport 'msg' (no vhost-user peer)")
        self.board = board
        self.build = build
        build.mkdir(parents=True, exist_ok=True)
        self.transport = transport
        self.spec = spec
        self.external = external
        self.device_names = [d.type for d in spec.devices] if spec else [n for n, _ in DEVICES]
        #: The host side and in-guest checks of each device beyond blk and rng (by type).
        self.smokes: dict[str, DeviceSmoke] = {}
        for name in self.device_names:
            smoke = device_smoke(name, build) if name not in VHOST_USER_KINDS else None
            if name not in VHOST_USER_KINDS and smoke is None:
                served = [*VHOST_USER_KINDS, *supported()]
                raise ConfigError(f"device {name!r}: `up` serves and checks {', '.join(served)}")
            if smoke is not None:
                if name in self.smokes:
                    raise ConfigError(f"device {name!r}: `up` serves one {name} device")
                if transport == "vhost-user" and smoke.qemu_kind is None:
                    raise ConfigError(
                        f"device {name!r}: QEMU 7.2 has no vhost-user {name} front-end; "
                        "serve it over virtio-msg (transport msg)"
                    )
                self.smokes[name] = smoke
        self.shm = (
            external.carveout_file
            if external
            else Path("/dev/shm") / f"edgevirt-{os.getpid()}-{secrets.token_hex(4)}"
        )
        self.sock_dir = build / "sockets"
        self.sock_dir.mkdir(exist_ok=True)
        devices = (
            [
                VhostUserDevice(
                    self._qemu_kind(name),
                    backend_socket(self.sock_dir, i, name),
                    f"vu{i}",
                    dict(self.smokes[name].qemu_options) if name in self.smokes else {},
                    chardev_options=dict(RECONNECT) if self._qemu_kind(name) in RECONNECTS else {},
                )
                for i, name in enumerate(self.device_names)
            ]
            if transport == "vhost-user"
            else []
        )
        self.config = QemuConfig(
            board.qemu,
            self.shm,
            devices,
            firmware=firmware,
            firmware_ram=firmware_ram,
            tftp_dir=build / "tftp" if tftp else None,
            console_pty=ser2net,
            console_device=console_device,
        )
        if transport == "msg":
            self.config.ivshmem_socket = (
                external.ivshmem_socket if external else self.sock_dir / "ivshmem.sock"
            )
        #: Export the console through Debian's ser2net (RFC2217 on loopback), like a lab.
        self.ser2net: Ser2net | None = None
        self.use_ser2net = ser2net
        self.disk = build / "disk.img"
        self.disk_size = disk_size
        self.images: Images | None = None
        self.guest_image: GuestImage | None = None
        self.qemu: QemuProcess | None = None
        self.backend: BackendProcess | None = None
        self.boots = 0

    def _qemu_kind(self, name: str) -> str:
        kind = self.smokes[name].qemu_kind if name in self.smokes else VHOST_USER_KINDS[name]
        assert kind is not None  # refused in __init__ for vhost-user
        return kind

    def _backend_arg(self, name: str) -> str:
        if name in self.smokes:
            return self.smokes[name].backend_arg()
        return f"blk:path={self.disk}" if name == "blk" else name

    # -- images -------------------------------------------------------------------------

    def prepare(
        self,
        reporter: Reporter,
        *,
        image_dir: Path | None = None,
        restrict: bool = True,
        kernel_fragment: Path | None = None,
        fit: bool = False,
    ) -> Images:
        if image_dir is not None:
            kernel, initrd = image_dir / "Image", image_dir / "initramfs.cpio.gz"
            for p in (kernel, initrd):
                if not p.is_file():
                    raise DeployError(f"--image {image_dir}: {p.name} is missing")
        else:
            kernel, initrd = self._build_image(reporter, kernel_fragment)
        if self.spec is not None or self.transport == "msg":
            if not restrict:
                raise ConfigError(
                    "--no-restrict applies to vhost-user without a spec: the virtio-msg bus "
                    "node always takes its DMA from the carve-out pool"
                )
            from edgevirt.deploy.system_dt import compose_guest_dt, default_spec

            spec = self.spec or default_spec(self.board, self.transport, self.device_names)
            reporter.step(f"device tree: {spec.name} composed for transport {self.transport}")
            gdt = compose_guest_dt(self.board, self.config, self.build, spec, self.transport)
            dtb, nodes = gdt.dtb, gdt.nodes
        else:
            nodes = mmio_nodes(len(self.device_names))
            reporter.step(
                "device tree: "
                + ("carve-out overlay on " + ", ".join(nodes) if restrict else "QEMU's own")
            )
            dtb = compose_dtb(self.board, self.config, self.build, restrict, nodes)
        self.images = Images(kernel, initrd, dtb, nodes=nodes)
        if self.config.tftp_dir is not None:
            tftp = self.config.tftp_dir
            tftp.mkdir(exist_ok=True)
            for src, name in ((kernel, "Image"), (initrd, "initramfs.cpio.gz"), (dtb, "guest.dtb")):
                shutil.copyfile(src, tftp / name)
        if fit:
            self.images.fit = self._fit(reporter)
        with open(self.disk, "wb") as f:
            f.truncate(self.disk_size)
        return self.images

    def _build_image(self, reporter: Reporter, fragment: Path | None) -> tuple[Path, Path]:
        """Kernel, modules and initramfs through the image builder, into the build dir."""
        from dataclasses import replace

        from edgevirt.image.build import build_guest_image
        from edgevirt.image.spec import load_image_spec

        spec_path = self.spec.path if self.spec and self.spec.path.is_file() else None
        ispec = load_image_spec(spec_path)
        if fragment is not None:
            ispec = replace(ispec, fragments=(*ispec.fragments, fragment))
        self.guest_image = build_guest_image(self.board, self.build, spec=ispec, reporter=reporter)
        return self.guest_image.image, self.guest_image.initramfs

    def _fit(self, reporter: Reporter) -> Path:
        from edgevirt.image.fit import FitLayout, build_fit

        assert self.images is not None
        reporter.step("FIT: kernel + initramfs + DTB (mkimage)")
        bl = self.board.raw.get("bootloader", {})
        # fdt and ramdisk get load addresses: used in place inside the FIT they would be
        # misaligned, and arm64 needs an 8-byte aligned DTB (the kernel dies silently).
        layout = FitLayout(
            kernel_load=int(bl.get("kernel_addr_r", 0x40400000)),
            ramdisk_load=bl.get("ramdisk_addr_r"),
            fdt_load=bl.get("fdt_addr_r"),
        )
        out = (self.config.tftp_dir or self.build) / "guest.itb"
        build_fit(
            out,
            kernel=self.images.kernel,
            ramdisk=self.images.initrd,
            fdt=self.images.dtb,
            layout=layout,
        )
        return out

    # -- power --------------------------------------------------------------------------

    @property
    def console_socket(self) -> Path:
        return self.build / "console.sock"

    @property
    def console_url(self) -> str:
        if self.ser2net is not None:
            return self.ser2net.url
        return f"unix://{self.console_socket}"

    def connected(self) -> None:
        """The console is attached: a machine started paused for ser2net may run now."""
        if self.use_ser2net and self.config.qmp_socket is not None:
            qmp = Qmp(self.config.qmp_socket)
            try:
                qmp.execute("cont")
            finally:
                qmp.close()

    def _start_ser2net(self) -> None:
        assert self.qemu is not None
        deadline = time.monotonic() + 30
        while not (
            m := re.search(r"char device redirected to (/dev/pts/\d+)", self.qemu.output_tail(50))
        ):
            self.qemu.check_alive()
            if time.monotonic() > deadline:
                raise DeployError("QEMU did not report its console pty within 30s")
            time.sleep(0.05)
        self.ser2net = Ser2net(f"serialdev,{m.group(1)},115200n81,local", self.build)

    def on(self) -> None:
        if self.images is None:
            raise DeployError("QEMU machine: prepare() the images before powering on")
        if self.qemu is not None:
            self.off()
        if self.external is None:
            self.backend = self._start_backend()
        c = self.config
        c.kernel, c.initrd, c.dtb = self.images.kernel, self.images.initrd, self.images.dtb
        c.console_socket = self.console_socket
        c.qmp_socket = self.build / "qmp.sock"
        c.append = f"console={self.board.console_kernel} panic=-1"
        self.console_socket.unlink(missing_ok=True)
        self.qemu = QemuProcess(c, self.build / "qemu.log")
        self.boots += 1
        if self.use_ser2net:
            self._start_ser2net()
        elif c.console_device is not None:
            wait_for_path(c.qmp_socket, 30, "QEMU QMP socket", self.qemu)
        else:
            wait_for_path(self.console_socket, 30, "QEMU console socket", self.qemu)

    def _start_backend(self) -> BackendProcess:
        devices = [self._backend_arg(n) for n in self.device_names]
        for smoke in self.smokes.values():
            smoke.before_backend()
        stats, log_path = self.build / "backend-stats.json", self.build / "backend.log"
        if self.transport == "msg":
            assert self.config.ivshmem_socket is not None
            with open(self.shm, "wb") as f:  # the back-end maps it, QEMU backs node 1 with it
                f.truncate(self.board.qemu.carveout)
            bus = IvshmemBus(self.config.ivshmem_socket, self.shm, self.board.qemu.carveout_base)
            backend = BackendProcess(devices, None, stats, log_path, msg=bus)
        else:
            backend = BackendProcess(devices, self.sock_dir, stats, log_path)
        try:
            backend.wait_ready()
            for smoke in self.smokes.values():
                smoke.after_backend()
        except BaseException:
            backend.stop()
            raise
        return backend

    def reset(self) -> None:
        """A warm reset through QMP: the same QEMU and back-end, the CPU starts over."""
        if self.qemu is None or not self.qemu.alive() or self.config.qmp_socket is None:
            super().reset()
            return
        qmp = Qmp(self.config.qmp_socket)
        try:
            qmp.execute("system_reset")
        finally:
            qmp.close()

    def check(self) -> None:
        if self.qemu is not None:
            self.qemu.check_alive()
        if self.backend is not None:
            self.backend.check_healthy()

    def wait_exit(self, timeout: float) -> bool:
        """Wait for the guest to power itself off (QEMU exits with -no-reboot)."""
        return self.qemu is None or self.qemu.wait(timeout) is not None

    def off(self) -> None:
        if self.ser2net is not None:
            self.ser2net.stop()
            self.ser2net = None
        if self.qemu is not None:
            self.qemu.stop()
            self.qemu = None
        if self.backend is not None:
            self.backend.stop()

    def close(self) -> None:
        try:
            self.off()
        finally:
            for smoke in self.smokes.values():
                smoke.close()
            self.shm.unlink(missing_ok=True)


def build_initramfs(out: Path, reporter: Reporter) -> Path:
    from edgevirt.image import initramfs as initramfs_mod
    from edgevirt.image.guest_tools import build_guest_tools
    from edgevirt.paths import images_dir

    reporter.step("initramfs: busybox (arm64) + /init + agent + test tools")
    busybox = initramfs_mod.fetch_busybox()
    src = images_dir() / "initramfs"
    extra: dict[str, initramfs_mod.ExtraFile] = {
        "/bin/edgevirt-agent": (src / "edgevirt-agent", 0o755)
    }
    extra.update(build_guest_tools(out.parent / "guest-tools"))
    initramfs_mod.build_initramfs(
        out,
        busybox=busybox,
        init_script=src / "init",
        extra_files=extra,
    )
    return out
