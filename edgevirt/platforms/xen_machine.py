"""The Xen machine on QEMU: images, host device tree, one QEMU, one console per domain.

``prepare`` builds what boots (front-end image from the image builder, the service domU's
rootfs with the back-end, Debian's Xen), dumps the base DTB of the exact machine
(``virt,virtualization=on,gic-version=3``, 2 GiB, 2 CPUs) and composes the host DTB and
partial DTBs (:mod:`edgevirt.devicetree.xen`). ``boot`` starts QEMU with Xen as
``-kernel`` and every module as a ``loader`` device at the load plan's address (the
direct path; a real board loads the same files with U-Boot, :mod:`.xen_uboot`), opens
Xen's UART and hands out one :class:`~edgevirt.console.xen.XenDomainConsole` per domain.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgevirt.console.xen import XenConsoleMux, XenDomainConsole
from edgevirt.deploy.qemucmd import qemu_base
from edgevirt.deploy.strategy import SHELL_READY
from edgevirt.devicetree.fdt import Fdt
from edgevirt.devicetree.xen import XenDt, compose_xen
from edgevirt.errors import DeployError, SetupError
from edgevirt.image.build import GuestImage, build_guest_image
from edgevirt.image.kernel import build_kernel
from edgevirt.image.modules import build_modules
from edgevirt.image.rootfs import ServiceRootfs, build_service_rootfs
from edgevirt.image.xen import XenBinary, fetch_xen
from edgevirt.isolation import scanner_module
from edgevirt.paths import images_dir
from edgevirt.platforms.xen_system import DOMID, FRONTEND, SERVICE, XenLayout, xen_system
from edgevirt.platforms.xen_uboot import SCRIPT_ADDR, BootScript, write_boot_script
from edgevirt.report import Reporter

log = logging.getLogger(__name__)

MACHINE = "virt,virtualization=on,gic-version=3"
CPU, SMP, MEMORY = "cortex-a57", 2, "2048M"
STATS = "/run/edgevirt/stats.json"
UBOOT_BIN = Path("/usr/lib/u-boot/qemu_arm64/u-boot.bin")
DISK = "/run/edgevirt/disk.img"


def service_config(devices: list[str], layout: XenLayout) -> dict:
    """The service domU's back-end configuration (baked into its rootfs)."""
    return {"devices": devices, "stats": STATS, "carveout_gpa": hex(layout.carveout_guest)}


@dataclass
class XenImages:
    frontend: GuestImage
    service: ServiceRootfs
    xen: XenBinary
    dt: XenDt | None = None


@dataclass
class XenMachine:
    build: Path
    layout: XenLayout = field(default_factory=XenLayout)
    disk_size: int = 64 << 20
    images: XenImages | None = None
    proc: subprocess.Popen[bytes] | None = None
    mux: XenConsoleMux | None = None
    consoles: dict[str, XenDomainConsole] = field(default_factory=dict)
    started: float = 0.0
    #: "direct" (QEMU loads Xen, DTB and modules) or "uboot" (u-boot-qemu runs the boot
    #: script over TFTP, as a real board would).
    boot_via: str = "direct"
    script: BootScript | None = None

    # -- images and device trees ----------------------------------------------------------

    def prepare(self, reporter: Reporter) -> XenImages:
        self.build.mkdir(parents=True, exist_ok=True)
        reporter.step("Xen: Debian's xen-hypervisor-4.17-arm64 (own .deb reader, cached)")
        xen = fetch_xen()
        reporter.step("front-end domU image: kernel, virtio_msg + edgevirt_dma, initramfs")
        fe = build_guest_image("qemu-virt", self.build / "frontend", reporter=reporter)
        reporter.step("service domU image: Python back-end, ev_evtchn + ev_scan")
        kb = build_kernel(progress=reporter.progress)
        own = sorted(p for p in (images_dir() / "xen" / "modules").iterdir() if p.is_dir())
        mods = build_modules(kb, [*own, scanner_module()])
        svc = build_service_rootfs(
            modules=[m.ko for m in mods],
            init_script=images_dir() / "xen" / "service-init",
            agent=images_dir() / "initramfs" / "edgevirt-agent",
            config=service_config(["blk:path=" + DISK, "rng"], self.layout)
            | {"disk_size": self.disk_size},
        )
        self.images = XenImages(fe, svc, xen)
        reporter.step("device trees: host DTB for Xen + partial DTB per domain (composer)")
        self.images.dt = self.compose()
        return self.images

    def base_dtb(self) -> Fdt:
        path = self.build / "base.dtb"
        cmd = qemu_base(f"{MACHINE},dumpdtb={path}", cpu=CPU, smp=SMP, memory=MEMORY)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode != 0 or not path.exists():
            raise SetupError(f"QEMU could not dump the Xen machine's DTB: {proc.stderr.strip()}")
        return Fdt.from_bytes(path.read_bytes())

    def compose(self) -> XenDt:
        assert self.images is not None
        system = xen_system(
            self.layout,
            kernel=self.images.frontend.image,
            frontend_initrd=self.images.frontend.initramfs,
            service_initrd=self.images.service.path,
        )
        dt = compose_xen(self.base_dtb(), system, self.build / "dt")
        (self.build / "dt" / "memory-map.json").write_text(
            json.dumps({"host": dt.host_map, "domains": dt.domain_maps}, indent=2)
        )
        return dt

    # -- QEMU -----------------------------------------------------------------------------

    def command(self) -> list[str]:
        assert self.images is not None and self.images.dt is not None
        dt = self.images.dt
        if self.boot_via == "uboot":
            if not UBOOT_BIN.exists():
                raise SetupError(f"{UBOOT_BIN} not found", hint="apt-get install u-boot-qemu")
            self.script = write_boot_script(dt, self.images.xen.image, self.build / "tftp")
            extra = ["-bios", str(UBOOT_BIN),
                     "-netdev", f"user,id=n0,tftp={self.script.dir}",
                     "-device", "virtio-net-device,netdev=n0"]  # fmt: skip
        else:
            extra = ["-dtb", str(dt.host_dtb), "-kernel", str(self.images.xen.image)]
            for ld in dt.loads:
                extra += ["-device", f"loader,file={ld.path},addr={ld.addr:#x},force-raw=on"]
        extra += ["-serial", f"unix:{self.socket},server=on,wait=off", "-monitor", "none"]
        return qemu_base(MACHINE, cpu=CPU, smp=SMP, memory=MEMORY, extra=extra)

    @property
    def socket(self) -> Path:
        return self.build / "xen-console.sock"

    def boot(self, reporter: Reporter, timeout: float) -> dict[str, XenDomainConsole]:
        """Start QEMU (Xen builds both domUs); return when both agents are up."""
        cmd = self.command()
        (self.build / "qemu.cmdline").write_text(" ".join(cmd) + "\n")
        self.socket.unlink(missing_ok=True)
        reporter.step("QEMU virt at EL2: Xen dom0less boots both domUs")
        self.started = time.monotonic()
        with open(self.build / "qemu.log", "wb") as qlog:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=qlog,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            self.alive()
            if time.monotonic() >= deadline:
                raise DeployError(f"QEMU made no console socket within 30s: {self._qemu_tail()}")
            time.sleep(0.05)
        self.mux = XenConsoleMux.open(f"unix://{self.socket}", self.build / "xen-console.log")
        if self.boot_via == "uboot":
            self._uboot(reporter, timeout)
        for name, domid in DOMID.items():
            self.consoles[name] = XenDomainConsole(
                self.mux.port_for(domid), log_path=self.build / f"{name}-console.log",
                name=f"{name} domU",
            )  # fmt: skip
        # The front-end's module waits for the service's back-end: it comes up last.
        for name in (SERVICE, FRONTEND):
            reporter.step(f"{name} domU: waiting for its agent")
            self.consoles[name].expect(SHELL_READY, timeout, self.alive)
        return self.consoles

    def _uboot(self, reporter: Reporter, timeout: float) -> None:
        """Stop autoboot, fetch the boot script over TFTP and run it."""
        assert self.mux is not None
        reporter.step("U-Boot (EL2): boot script over TFTP loads Xen, DTB, domU modules")
        at = self.mux.expect_raw(rb"Hit any key to stop autoboot", 60, abort=self.alive)
        self.mux.send_raw(b" ")
        at = self.mux.expect_raw(rb"=> ", 20, at, self.alive)
        for cmd in ("setenv autoload no", "setenv tftpblocksize 1468", "dhcp",
                    f"tftpb {SCRIPT_ADDR:#x} boot.scr", f"source {SCRIPT_ADDR:#x}"):  # fmt: skip
            self.mux.send_raw(cmd.encode() + b"\r")
            if cmd.startswith("source"):
                break
            at = self.mux.expect_raw(rb"=> ", timeout, at, self.alive)
        self.mux.expect_raw(rb"Starting kernel", timeout, at, self.alive)

    def _qemu_tail(self) -> str:
        try:
            return (self.build / "qemu.log").read_text(errors="replace")[-500:].strip()
        except OSError:
            return ""

    def alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise DeployError(f"QEMU (Xen) exited with status {self.proc.returncode}: "
                              f"{self._qemu_tail()}")  # fmt: skip

    def xen_log(self) -> list[str]:
        return list(self.mux.xen_lines) if self.mux else []

    def stop(self) -> None:
        for c in self.consoles.values():
            c.log.close()
        if self.mux is not None:
            self.mux.close()
            self.mux = None
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None
