"""Two VMs end to end: the back-end in an aarch64 service VM serves the front-end VM.

::

    host (the "hypervisor": edgevirt.servicevm.hypervisor, no virtio)
      owns /dev/shm/<carve-out> and /dev/shm/<message memory>, wires doorbells (ivshmem)
        │                                         │
    front-end VM (guest)                      service VM
      NUMA node 1 = carve-out file              ivshmem-plain  BAR2 = carve-out file
      ivshmem-doorbell BAR2 = message memory    ivshmem-doorbell BAR2 = message memory
      virtio_msg.ko + restricted-dma-pool       ev_ivshmem.ko + python3 -m edgevirt.servicevm.peer
      virtio_blk, virtio-rng (unmodified)       blk → its own /dev/vda (a host file), rng

This module is the back-end placement ``service-vm`` of :func:`edgevirt.up.up`
(:class:`ServiceVmBackend`); the front-end is the same virtio-msg guest as with the
back-end on the host, its device tree from the composer (carve-out pool + bus node). The
service VM needs **no** carve-out node: it reaches the carve-out through a PCI BAR, not as
RAM, so QEMU's own DTB boots it unchanged.

Order: host side, service VM (until its back-end reports running), front-end VM, smoke
suite on the front-end's console, health checks on the service VM's console, power-off of
both, host checks. ``fault`` injects a failure: ``"late-service"`` (the front-end boots
while no service VM runs) or ``"backend-crash"`` (the back-end is killed before the
front-end boots); either way the front-end's module must time out with a clear message and
the report names the failed VM (``failed_vm``). ``"service-restart"`` kills the service VM
under the running front-end and boots a new one, whose devices must reset and come back
(:mod:`edgevirt.servicevm.restart`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgevirt.board import Board
from edgevirt.console.expect import Console
from edgevirt.deploy.backend_process import WatchedProcess
from edgevirt.deploy.machine import ExternalBus, QemuMachine
from edgevirt.deploy.qemu import QemuConfig, QemuProcess, wait_for_path
from edgevirt.deploy.strategy import SHELL_READY
from edgevirt.devsmoke import DeviceSmoke
from edgevirt.errors import ConfigError, DeployError
from edgevirt.isolation import bounce_plant, isolation_check
from edgevirt.report import Reporter
from edgevirt.servicevm.image import build_service_image
from edgevirt.servicevm.peer import PeerConfig
from edgevirt.servicevm.restart import ServiceRestart
from edgevirt.smoke import Check, backend_checks, disk_check
from edgevirt.up import DEVICES, Placement, UpOptions, UpResult, Workload, up

if TYPE_CHECKING:
    from edgevirt.servicevm.image import ServiceImage

log = logging.getLogger(__name__)

SERVICE_ID, FRONTEND_ID = 1, 2
CARVEOUT_PCI, MSG_PCI = "0000:00:04.0", "0000:00:05.0"
MSG_SIZE = 64 << 10
SERVICE_RAM = 512 << 20
STATS = "/run/edgevirt/stats.json"
FAULTS = ("late-service", "backend-crash", "service-restart")

__all__ = ["FAULTS", "ServiceVmBackend", "peer_config", "up_service_vm"]


def peer_config(
    board: Board,
    devices: list[str] | tuple[str, ...] = DEVICES,
    smokes: Mapping[str, DeviceSmoke] | None = None,
) -> PeerConfig:
    """The service VM's back-end configuration (baked into its rootfs): ``devices`` in bus
    order, each a type (blk: the service VM's own disk) or a full device string; a type
    with a smoke check in ``smokes`` gets that smoke's device string and peripherals."""
    s = board.qemu
    smokes = smokes or {}
    devs = ["blk:path=/dev/vda" if d == "blk" else smokes[d].service_arg() if d in smokes
            else d for d in devices]  # fmt: skip
    made: dict = {}
    for smoke in smokes.values():
        made |= smoke.service_peripherals()
    return PeerConfig(CARVEOUT_PCI, s.carveout_base, MSG_PCI, FRONTEND_ID,
                      carveout_size=s.carveout, devices=devs, stats=STATS,
                      peripherals=made)  # fmt: skip


class ServiceQemuConfig(QemuConfig):
    """The service VM: plain RAM, the carve-out and message memory as ivshmem BARs, and its
    own disk (virtio-blk on virtio-mmio: the storage the back-end serves)."""

    disk: Path | None = None

    def memory_args(self) -> list[str]:
        return ["-m", f"{SERVICE_RAM >> 20}M"]

    def device_args(self) -> list[str]:
        s = self.settings
        if self.ivshmem_socket is None or self.disk is None:
            raise DeployError("service VM needs the hypervisor's socket and a disk")
        slot = lambda pci: str(int(pci.split(":")[2].split(".")[0], 16))  # noqa: E731
        return [
            "-object",
            (f"memory-backend-file,id=ev-carveout,size={s.carveout >> 20}M,"
             f"mem-path={self.carveout_file},share=on"),
            "-device", f"ivshmem-plain,memdev=ev-carveout,addr={slot(CARVEOUT_PCI)}",
            "-chardev", f"socket,id=ev-ivshmem,path={self.ivshmem_socket}",
            "-device", f"ivshmem-doorbell,chardev=ev-ivshmem,vectors=2,addr={slot(MSG_PCI)}",
            "-global", "virtio-mmio.force-legacy=false",
            "-drive", f"if=none,id=ev-disk,file={self.disk},format=raw,cache=writeback",
            "-device", "virtio-blk-device,drive=ev-disk",
        ]  # fmt: skip

    def boot_args(self) -> list[str]:
        if not (self.kernel and self.initrd):
            raise DeployError("service VM direct boot needs kernel and initrd")
        return ["-kernel", str(self.kernel), "-initrd", str(self.initrd), "-append", self.append]


class HypervisorProcess(WatchedProcess):
    """``python -m edgevirt.servicevm.hypervisor`` as a child, observed by its state file."""

    what = "host side (hypervisor)"
    error = DeployError

    def __init__(self, carveout: Path, size: int, msg: Path, build: Path) -> None:
        self.sockets = {"service": build / "service.sock", "front-end": build / "frontend.sock"}
        argv = [sys.executable, "-m", "edgevirt.servicevm.hypervisor", "--carveout", str(carveout),
                "--carveout-size", str(size), "--msg", str(msg), "--msg-size", str(MSG_SIZE),
                "--peer", f"service={self.sockets['service']}:{SERVICE_ID}",
                "--peer", f"front-end={self.sockets['front-end']}:{FRONTEND_ID}",
                "--state", str(build / "hypervisor.json")]  # fmt: skip
        super().__init__(argv, build / "hypervisor.json", build / "hypervisor.log")

    def state(self) -> dict:
        """Who is attached, how often ({} before the first write)."""
        return self.stats()


@dataclass
class _Vm:
    name: str
    qemu: QemuProcess
    console: Console

    def alive(self) -> None:
        try:
            self.qemu.check_alive()
        except DeployError as e:
            raise DeployError(f"{self.name} VM: {e}") from e


def _boot(name: str, cfg: QemuConfig, build: Path, timeout: float) -> _Vm:
    assert cfg.console_socket is not None
    qemu = QemuProcess(cfg, build / "qemu.log")
    try:  # the caller only cleans up the VMs it got back
        wait_for_path(cfg.console_socket, 30, f"{name} VM console socket", qemu)
        console = Console.open(
            f"unix://{cfg.console_socket}", log_path=build / "console.log", name=name
        )
    except BaseException:
        qemu.stop()
        raise
    vm = _Vm(name, qemu, console)
    try:
        console.expect(SHELL_READY, timeout, vm.alive)
    except BaseException:
        console.close()
        qemu.stop()
        raise
    return vm


def service_health(vm: _Vm, carveout: int, expect_io: bool) -> tuple[list[Check], dict]:
    """Health checks on the service VM's console; returns them and the back-end's stats."""
    c = vm.console
    checks: list[Check] = []
    pid = c.run("cat /run/edgevirt/backend.pid; kill -0 $(cat /run/edgevirt/backend.pid)", 20)
    alive = pid.status == 0
    log_tail = c.run("tail -n 5 /run/edgevirt/backend.log", 20).output
    state = "running" if alive else f"not running; log: {log_tail[-300:]}"
    pid_text = pid.output.split()[0] if pid.output else "?"
    checks.append(Check("service VM: back-end process", alive, f"pid {pid_text} {state}"))
    raw = c.run(f"cat {STATS}", 20).output
    try:
        stats = dict(json.loads(raw))
    except ValueError:
        stats = {}
    link = stats.get("link") or {}
    checks.append(Check("service VM: doorbells", link.get("mode") == "msi-x",
                        f"ivshmem {link.get('pci')} peer {link.get('own_id')} → driver "
                        f"{link.get('driver_peer')}, mode {link.get('mode')}"))  # fmt: skip
    if not expect_io:
        return checks, stats
    irq = c.run("grep ev_ivshmem /proc/interrupts", 20).output
    counts = [int(n) for ln in irq.splitlines() for n in ln.split()[1:2] if n.isdigit()]
    checks.append(Check("service VM: MSI-X interrupts", sum(counts) > 0,
                        f"{sum(counts)} ev_ivshmem interrupts, "
                        f"{stats.get('doorbells_in', 0)} doorbells in, "
                        f"{stats.get('doorbells_out', 0)} out"))  # fmt: skip
    checks += backend_checks(stats, carveout, prefix="service VM: ")
    return checks, stats


class ServiceVmBackend(Placement):
    """The back-end inside a service VM; the host runs only the hypervisor component."""

    name = "service-vm"
    prefix = "front-end: "

    def __init__(self, board: Board, build: Path, opts: UpOptions) -> None:
        if opts.fault is not None and opts.fault not in FAULTS:
            raise ConfigError(f"fault {opts.fault!r}: expected one of {', '.join(FAULTS)}")
        self.board, self.build, self.opts = board, build, opts
        self.svc_dir = build / "service"
        tag = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.carveout = Path("/dev/shm") / f"edgevirt-svm-carveout-{tag}"
        self.msgmem = Path("/dev/shm") / f"edgevirt-svm-msg-{tag}"
        self.hv: HypervisorProcess | None = None
        self.svc: _Vm | None = None
        self.image: ServiceImage | None = None
        self.disk = self.svc_dir / "disk.img"
        self.sockets = {"service": build / "service.sock", "front-end": build / "frontend.sock"}
        self.restart = ServiceRestart(self) if opts.fault == "service-restart" else None
        #: The front-end's devices in bus order, and the smoke checks whose far side the
        #: service VM serves (its TAP, unix sockets, gpio-sim, i2c-stub).
        self.devices: tuple[str, ...] = DEVICES
        self.smokes: dict[str, DeviceSmoke] = {}

    def frontend_dir(self, build: Path) -> Path:
        return build / "frontend"

    def deploy_options(self) -> dict[str, Any]:
        return {"external": ExternalBus(self.carveout, self.sockets["front-end"])}

    def frontend(self, machine: QemuMachine) -> None:
        self.devices, self.smokes = tuple(machine.device_names), machine.smokes
        for smoke in self.smokes.values():
            smoke.in_service_vm = True

    def prepare(self, reporter: Reporter, result: UpResult) -> None:
        self.svc_dir.mkdir(parents=True, exist_ok=True)
        reporter.step("service-VM image: Debian arm64 Python 3.11 + edgevirt + ev_ivshmem")
        cfg = peer_config(self.board, self.devices, self.smokes)
        self.image = build_service_image(cfg, reporter)
        result.image = {"rootfs": str(self.image.rootfs.path), **self.image.rootfs.manifest}
        result.image.pop("config", None)
        with open(self.disk, "wb") as f:
            f.truncate(self.opts.disk_size)

    def start(self, reporter: Reporter, result: UpResult) -> None:
        assert self.image is not None
        reporter.step("host side: shared-memory files + ivshmem server (no virtio)")
        s = self.board.qemu
        self.hv = HypervisorProcess(self.carveout, s.carveout, self.msgmem, self.build)
        self.hv.wait_ready()
        if self.opts.fault == "late-service":
            return
        reporter.step("service VM: boot, wait for the back-end")
        t = time.monotonic()
        booted = self.boot_service(self.svc_dir)
        result.timings["service_boot"] = booted - t
        result.timings["backend_ready"] = time.monotonic() - t
        if self.opts.fault == "backend-crash":
            reporter.step("fault: killing the back-end in the service VM")
            assert self.svc is not None
            self.svc.console.run("kill -9 $(cat /run/edgevirt/backend.pid); sleep 0.5", 20)
        reporter.step("front-end VM: boot, smoke suite over its console")

    def boot_service(self, svc_dir: Path) -> float:
        """Boot a service VM on the host side with its console and logs in ``svc_dir``,
        wait until its back-end reports running; returns when the VM reached its shell."""
        assert self.image is not None and self.hv is not None
        scfg = ServiceQemuConfig(self.board.qemu, self.carveout)
        scfg.ivshmem_socket, scfg.disk = self.hv.sockets["service"], self.disk
        scfg.kernel, scfg.initrd = self.image.kernel.image, self.image.rootfs.path
        scfg.append = f"console={self.board.console_kernel} panic=-1"
        svc_dir.mkdir(parents=True, exist_ok=True)
        scfg.console_socket = svc_dir / "console.sock"
        scfg.console_socket.unlink(missing_ok=True)
        self.svc = svc = _boot("service", scfg, svc_dir, self.opts.boot_timeout)
        booted = time.monotonic()
        r = svc.console.run(
            f"i=0; while [ ! -s {STATS} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done;"
            f" test -s {STATS}", 90, svc.alive,
        )  # fmt: skip
        if self.smokes and r.status != 0:  # nothing to drive their far side
            tail = svc.console.run("tail -n 5 /run/edgevirt/backend.log", 20).output
            raise DeployError(f"service VM: its back-end did not report running: {tail[-400:]}")
        for smoke in self.smokes.values():  # their far side is this VM now
            smoke.attach_service(svc.console)
        return booted

    def kill_service(self) -> None:
        """SIGKILL the service VM's QEMU (a crash, no shutdown); the host side stays."""
        svc = self.svc
        assert svc is not None
        for smoke in self.smokes.values():
            smoke.service = None
        os.killpg(svc.qemu.pid, signal.SIGKILL)
        svc.qemu.wait(20)
        svc.console.close()
        svc.qemu.stop()
        self.svc = None

    def watchers(self) -> list[Callable[[], None]]:
        return [self._service_alive] if self.svc is not None else []

    def _service_alive(self) -> None:
        """The service VM that runs now (none while it restarts)."""
        if self.svc is not None:
            self.svc.alive()

    def under_frontend(
        self, reporter: Reporter, result: UpResult, console: Console, abort: Callable[[], None]
    ) -> None:
        if self.restart is not None:
            self.restart.run(reporter, result, console, abort)
        elif self.opts.fault is None and self.svc is not None:
            # The same proof as on Xen, for comparison: here the host kernel's process
            # boundary (two QEMUs, one shared file) is what keeps the private RAM away.
            reporter.step("isolation: secrets in front-end RAM and carve-out, scan in service")
            t = time.monotonic()
            # The disk's last page: past the smoke suite's 8 MiB round trip.
            plant = bounce_plant("/dev/vda", max(8 << 20, self.opts.disk_size - 4096))
            result.checks += isolation_check(console, self.svc.console, plant, "service VM")
            result.timings["isolation_scan"] = time.monotonic() - t

    def after_suite(self, reporter: Reporter, result: UpResult, frontend_ok: bool) -> None:
        assert self.hv is not None
        result.hypervisor = self.hv.state()
        if self.svc is None:
            attached = result.hypervisor.get("peers", {}).get("service", {}).get("attached")
            result.checks.append(Check("service VM: running", False,
                                       f"no service VM (ivshmem peer {SERVICE_ID} attached: "
                                       f"{attached})"))  # fmt: skip
            return
        reporter.step("service VM: health checks")
        checks, result.backend = service_health(self.svc, result.carveout[1], frontend_ok)
        result.checks += checks
        if self.restart is not None and self.restart.hashes:
            result.checks.append(self.restart.service_check(result.backend))

    def power_off(self, reporter: Reporter) -> None:
        if self.svc is None:
            return
        reporter.step("power-off: service VM")
        self.svc.console.run("sync", 30)
        self.svc.console.sendline("poweroff -f")
        if self.svc.qemu.wait(20) is None:
            raise DeployError("service VM did not power off within 20s")

    def host_checks(
        self, machine: QemuMachine, result: UpResult, disk_output: str | None, frontend_ok: bool
    ) -> list[Check]:
        if self.restart is not None and self.restart.hashes:
            assert self.hv is not None
            result.hypervisor = self.hv.state()
            return self.restart.host_checks(self.disk, result.hypervisor, SERVICE_ID)
        if not frontend_ok or disk_output is None:
            return []
        return [disk_check(self.disk, disk_output, "host: service VM's disk image")]

    def close(self, result: UpResult) -> None:
        try:
            if self.svc is not None:
                self.svc.console.close()
                self.svc.qemu.stop()
        finally:
            if self.hv is not None:
                result.hypervisor = self.hv.state() or result.hypervisor
                self.hv.stop()
            for shm in (self.carveout, self.msgmem):
                shm.unlink(missing_ok=True)

    def blame(self, result: UpResult) -> str | None:
        """The service VM if any of its checks failed (a dead back-end makes the front-end
        fail too) or the error is its own, else the front-end; None when all passed."""
        if result.ok:
            return None
        failed = [c.name for c in result.checks if not c.ok]
        if any(n.startswith("service VM:") for n in failed):
            return "service"
        if result.error and result.error.startswith("service"):
            return "service"
        return "front-end"


def up_service_vm(
    build_dir: Path,
    *,
    board: str = "qemu-virt",
    disk_size: int = 64 << 20,
    boot_timeout: float = 180.0,
    fault: str | None = None,
    reporter: Reporter | None = None,
    workload: Workload | None = None,
) -> UpResult:
    """``edgevirt up --transport msg --backend service-vm`` as a function (see the module
    docstring). ``workload(console, abort)`` runs on the front-end's console after the
    smoke suite; what it returns lands in ``result.workload`` (the benchmark uses it)."""
    if fault is not None and fault not in FAULTS:
        raise ConfigError(f"fault {fault!r}: expected one of {', '.join(FAULTS)}")
    opts = UpOptions(
        build_dir, board=board, transport="msg", backend="service-vm", disk_size=disk_size,
        boot_timeout=boot_timeout, fault=fault, workload=workload,
    )  # fmt: skip
    return up(opts, reporter)
