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

The front-end's device tree carries the carve-out pool and the virtio-msg bus node (as in
:mod:`edgevirt.msgup`). The service VM needs **no** carve-out node: it reaches the carve-out
through a PCI BAR, not as RAM, so QEMU's own DTB boots it unchanged.

Order: host side, service VM (until its back-end reports running), front-end VM, smoke
suite on the front-end's console, health checks on the service VM's console, power-off of
both, host checks. ``fault`` injects a failure: ``"late-service"`` (the front-end boots
while no service VM runs) or ``"backend-crash"`` (the back-end is killed before the
front-end boots); either way the front-end's module must time out with a clear message and
the report names the failed VM.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgevirt.board import load_board
from edgevirt.console.expect import Console
from edgevirt.deploy.qemu import QemuConfig, QemuProcess, wait_for_path
from edgevirt.errors import ConfigError, DeployError, EdgevirtError, SetupError
from edgevirt.msgup import MsgQemuConfig, msg_checks, prepare_guest
from edgevirt.report import Reporter
from edgevirt.servicevm.image import build_service_image
from edgevirt.servicevm.peer import PeerConfig
from edgevirt.smoke import DISK_TEST_BYTES, Check

log = logging.getLogger(__name__)

SERVICE_ID, FRONTEND_ID = 1, 2
CARVEOUT_PCI, MSG_PCI = "0000:00:04.0", "0000:00:05.0"
MSG_SIZE = 64 << 10
SERVICE_RAM = 512 << 20
STATS = "/run/edgevirt/stats.json"
FAULTS = ("late-service", "backend-crash")
READY = rb"EDGEVIRT-AGENT-READY[^\n]*\n"
Workload = Callable[[Console, Callable[[], None]], dict]


@dataclass
class ServiceUpResult:
    board: str
    checks: list[Check] = field(
        default_factory=list
    )  # names start "front-end:", "service VM:", "host:"
    failed_vm: str | None = None  # "service", "front-end" or None
    error: str | None = None
    fault: str | None = None
    backend: dict = field(default_factory=dict)  # the back-end's stats, read in the service VM
    hypervisor: dict = field(default_factory=dict)
    image: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    workload: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.checks) and all(c.ok for c in self.checks)

    def to_json(self) -> dict:
        return {
            "board": self.board,
            "transport": "virtio-msg",
            "backend_in": "service-vm",
            "ok": self.ok,
            "failed_vm": self.failed_vm,
            "error": self.error,
            "fault": self.fault,
            "checks": [c.__dict__ for c in self.checks],
            "backend": self.backend,
            "hypervisor": self.hypervisor,
            "image": self.image,
            "timings": self.timings,
            "workload": self.workload,
            "seconds": self.seconds,
        }


class ServiceQemuConfig(QemuConfig):
    """The service VM: plain RAM, the carve-out and message memory as ivshmem BARs, and its
    own disk (virtio-blk on virtio-mmio: the storage the back-end serves)."""

    ivshmem_socket: Path | None = None
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


class HypervisorProcess:
    """``python -m edgevirt.servicevm.hypervisor`` as a child, observed by its state file."""

    def __init__(self, carveout: Path, size: int, msg: Path, build: Path) -> None:
        self.state_path = build / "hypervisor.json"
        self.log_path = build / "hypervisor.log"
        self.state_path.unlink(missing_ok=True)
        self.sockets = {"service": build / "service.sock", "front-end": build / "frontend.sock"}
        cmd = [sys.executable, "-m", "edgevirt.servicevm.hypervisor", "--carveout", str(carveout),
               "--carveout-size", str(size), "--msg", str(msg), "--msg-size", str(MSG_SIZE),
               "--peer", f"service={self.sockets['service']}:{SERVICE_ID}",
               "--peer", f"front-end={self.sockets['front-end']}:{FRONTEND_ID}",
               "--state", str(self.state_path)]  # fmt: skip
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.state_path.exists():
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
                raise DeployError(f"host side (hypervisor) exited: {' | '.join(tail)}")
            if time.monotonic() >= deadline:
                raise DeployError(f"host side (hypervisor) not ready within {timeout:.0f}s")
            time.sleep(0.05)

    def state(self) -> dict:
        try:
            return dict(json.loads(self.state_path.read_text()))
        except (OSError, ValueError):
            return {}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


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
        console.expect(READY, timeout, vm.alive)
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
    for d in stats.get("devices", []):
        ok = (d.get("mapped_bytes") == carveout and d.get("refused") == 0
              and d.get("requests", 0) > 0 and not d.get("broken"))  # fmt: skip
        name = f"service VM: back-end {d.get('device')} (dev {d.get('dev_num')})"
        detail = (f"mapped {d.get('mapped_bytes', 0):#x} of carve-out {carveout:#x}, "
                  f"{d.get('requests', 0)} requests, {d.get('refused')} refused")  # fmt: skip
        checks.append(Check(name, ok, detail))
    errors = stats.get("protocol_errors", 0)
    checks.append(Check("service VM: virtio-msg protocol", bool(stats) and errors == 0,
                        f"{stats.get('messages_in', 0)} messages in, "
                        f"{stats.get('messages_out', 0)} out, {errors} discarded"))  # fmt: skip
    return checks, stats


def _fe_checks(vm: _Vm, base: int, size: int, abort: object) -> tuple[list[Check], dict[str, str]]:
    checks, outputs = [], {}
    for gc in msg_checks(base, size):
        res = vm.console.run(gc.command, gc.timeout, abort)  # type: ignore[arg-type]
        outputs[gc.name] = res.output
        ok, detail = gc.judge(res)
        checks.append(Check(f"front-end: {gc.name}", ok, detail))
    return checks, outputs


def _module_error(vm: _Vm) -> str:
    out = vm.console.run("dmesg | grep 'virtio-msg' | grep -iE 'no |dead|timeout|error'", 20)
    return out.output.strip().splitlines()[0] if out.output.strip() else ""


def up_service_vm(
    build_dir: Path,
    *,
    board: str = "qemu-virt",
    disk_size: int = 64 << 20,
    boot_timeout: float = 180.0,
    fault: str | None = None,
    reporter: Reporter | None = None,
    workload: Workload | None = None,
) -> ServiceUpResult:
    """The whole two-VM path (see the module docstring). ``workload(console, abort)`` runs
    on the front-end's console after the smoke suite; what it returns lands in
    ``result.workload`` (the benchmark uses it)."""
    if fault is not None and fault not in FAULTS:
        raise ConfigError(f"fault {fault!r}: expected one of {', '.join(FAULTS)}")
    reporter = reporter or Reporter()
    t0 = time.monotonic()
    b = load_board(board)
    s = b.qemu
    build = build_dir.resolve()
    fe_dir, svc_dir = build / "frontend", build / "service"
    for d in (fe_dir, svc_dir):
        d.mkdir(parents=True, exist_ok=True)
    result = ServiceUpResult(board=b.name, fault=fault)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    carveout = Path("/dev/shm") / f"edgevirt-svm-carveout-{tag}"
    msgmem = Path("/dev/shm") / f"edgevirt-svm-msg-{tag}"
    hv: HypervisorProcess | None = None
    vms: list[_Vm] = []
    svc: _Vm | None = None
    fe: _Vm | None = None
    try:
        reporter.step("front-end image: kernel, virtio_msg.ko, initramfs, DT (carve-out + bus)")
        fcfg = MsgQemuConfig(s, carveout)
        prepare_guest(fcfg, fe_dir, reporter)
        reporter.step("service-VM image: Debian arm64 Python 3.11 + edgevirt + ev_ivshmem")
        pcfg = PeerConfig(CARVEOUT_PCI, s.carveout_base, MSG_PCI, FRONTEND_ID,
                          carveout_size=s.carveout, devices=["blk:path=/dev/vda", "rng"],
                          stats=STATS)  # fmt: skip
        image = build_service_image(pcfg, reporter)
        result.image = {"rootfs": str(image.rootfs.path), **image.rootfs.manifest}
        result.image.pop("config", None)
        disk = svc_dir / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(disk_size)

        reporter.step("host side: shared-memory files + ivshmem server (no virtio)")
        hv = HypervisorProcess(carveout, s.carveout, msgmem, build)
        hv.wait_ready()
        fcfg.ivshmem_socket = hv.sockets["front-end"]
        fcfg.append = f"console={b.console_kernel} panic=-1"
        scfg = ServiceQemuConfig(s, carveout)
        scfg.ivshmem_socket, scfg.disk = hv.sockets["service"], disk
        scfg.kernel, scfg.initrd = image.kernel.image, image.rootfs.path
        scfg.append = f"console={b.console_kernel} panic=-1"
        scfg.console_socket = svc_dir / "console.sock"
        scfg.console_socket.unlink(missing_ok=True)

        if fault != "late-service":
            reporter.step("service VM: boot, wait for the back-end")
            t = time.monotonic()
            svc = _boot("service", scfg, svc_dir, boot_timeout)
            vms.append(svc)
            result.timings["service_boot"] = time.monotonic() - t
            svc.console.run(
                f"i=0; while [ ! -s {STATS} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done;"
                f" test -s {STATS}", 90, svc.alive,
            )  # fmt: skip
            result.timings["backend_ready"] = time.monotonic() - t
            if fault == "backend-crash":
                reporter.step("fault: killing the back-end in the service VM")
                svc.console.run("kill -9 $(cat /run/edgevirt/backend.pid); sleep 0.5", 20)

        reporter.step("front-end VM: boot, smoke suite over its console")
        t = time.monotonic()
        fe = _boot("front-end", fcfg, fe_dir, boot_timeout)
        vms.append(fe)
        result.timings["frontend_boot"] = time.monotonic() - t
        watched = list(vms)

        def abort() -> None:
            for vm in watched:
                vm.alive()

        t = time.monotonic()
        fe_checks, outputs = _fe_checks(fe, s.carveout_base, s.carveout, abort)
        result.timings["frontend_suite"] = time.monotonic() - t
        result.checks += fe_checks
        fe_ok = all(c.ok for c in fe_checks)
        if fe_ok and workload is not None:
            reporter.step("front-end: workload")
            result.workload = workload(fe.console, abort)
        if not fe_ok:
            why = _module_error(fe)
            if why:
                result.checks.append(Check("front-end: virtio-msg module", False, why))

        result.hypervisor = hv.state()
        if svc is None:
            attached = result.hypervisor.get("peers", {}).get("service", {}).get("attached")
            result.checks.append(Check("service VM: running", False,
                                       f"no service VM (ivshmem peer {SERVICE_ID} attached: "
                                       f"{attached})"))  # fmt: skip
        else:
            reporter.step("service VM: health checks")
            svc_checks, result.backend = service_health(svc, s.carveout, expect_io=fe_ok)
            result.checks += svc_checks

        reporter.step("power-off: front-end, then service VM")
        fe.console.sendline("poweroff -f")
        if fe.qemu.wait(20) is None:
            raise DeployError("front-end VM did not power off within 20s")
        if svc is not None:
            svc.console.run("sync", 30)
            svc.console.sendline("poweroff -f")
            if svc.qemu.wait(20) is None:
                raise DeployError("service VM did not power off within 20s")
        if fe_ok and workload is None:  # a workload may overwrite what the suite wrote
            result.checks.append(_disk_check(disk, outputs.get("blk write/read-back")))
    except (SetupError, ConfigError):
        raise
    except EdgevirtError as e:
        result.error = str(e) + (f" (hint: {e.hint})" if e.hint else "")
    finally:
        for vm in vms:
            vm.console.close()
            vm.qemu.stop()
        if hv is not None:
            result.hypervisor = hv.state() or result.hypervisor
            hv.stop()
        for shm in (carveout, msgmem):
            shm.unlink(missing_ok=True)
        result.failed_vm = _blame(result)
        result.seconds = time.monotonic() - t0
        (build / "result.json").write_text(json.dumps(result.to_json(), indent=2))
    return result


def _disk_check(disk: Path, guest_out: str | None) -> Check:
    hashes = re.findall(r"^([0-9a-f]{64})\b", guest_out or "", re.M)
    with open(disk, "rb") as f:
        host = hashlib.sha256(f.read(DISK_TEST_BYTES)).hexdigest()
    ok = bool(hashes) and hashes[0] == host
    verdict = "matches the front-end's" if ok else "differs from the front-end's"
    return Check("host: service VM's disk image", ok, f"sha256 {host[:16]}… {verdict}")


def _blame(result: ServiceUpResult) -> str | None:
    """Which VM failed: the service VM if any of its checks failed (a dead back-end makes the
    front-end fail too), else the front-end; None when all passed."""
    if result.ok:
        return None
    failed = [c.name for c in result.checks if not c.ok]
    if any(n.startswith("service VM:") for n in failed):
        return "service"
    if result.error and result.error.startswith("service"):
        return "service"
    return "front-end"
