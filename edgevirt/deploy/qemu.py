"""QEMU `virt` as a target: DTB dump, command line, process lifetime.

The memory topology is what isolates the carve-out (DESIGN §3): NUMA node 0 is private
RAM, node 1 is a shared file (``/dev/shm``) that QEMU places right after node 0. vhost-user
only hands fd-backed RAM to back-ends, so a back-end receives the carve-out and nothing else.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgevirt.board import QemuSettings
from edgevirt.deploy.qemucmd import qemu_base
from edgevirt.devicetree.fdt import Fdt
from edgevirt.devicetree.seeds import zero_boot_seeds
from edgevirt.errors import DeployError, SetupError

log = logging.getLogger(__name__)


@dataclass
class VhostUserDevice:
    """A ``-device vhost-user-*`` plugged into the virt machine's virtio-mmio bus."""

    kind: str  # QEMU device type, e.g. vhost-user-blk; virtio-net-device: -netdev vhost-user
    socket: Path
    id: str
    options: dict[str, str] = field(default_factory=dict)
    #: Options of the socket chardev, e.g. ``{"reconnect": "1"}`` (QEMU reconnects to a
    #: restarted back-end after that many seconds).
    chardev_options: dict[str, str] = field(default_factory=dict)


@dataclass
class QemuConfig:
    settings: QemuSettings
    carveout_file: Path
    devices: list[VhostUserDevice] = field(default_factory=list)
    kernel: Path | None = None
    initrd: Path | None = None
    dtb: Path | None = None
    append: str = ""
    console_socket: Path | None = None
    qmp_socket: Path | None = None
    #: Firmware to run instead of a direct kernel boot (U-Boot's ``u-boot.bin``).
    firmware: Path | None = None
    #: RAM for the firmware, as a third NUMA node above the carve-out (see memory_args).
    firmware_ram: int = 0
    #: Serve this directory over QEMU's user-network TFTP (10.0.2.2) to a virtio-net NIC.
    tftp_dir: Path | None = None
    #: Console on a pseudo-terminal (a serial device for ser2net) instead of a socket.
    console_pty: bool = False
    #: Console on this serial device (a lab's UART adapter stand-in: one end of a pty
    #: pair) instead of a socket; the machine runs at once, as a powered board does.
    console_device: Path | None = None
    #: virtio-msg: the ivshmem server socket of an ``ivshmem-doorbell`` device (its BAR2 is
    #: the message memory, its doorbell register and MSI-X vectors the doorbells).
    ivshmem_socket: Path | None = None

    def memory_args(self) -> list[str]:
        s = self.settings
        total = s.ram + s.carveout + self.firmware_ram
        # U-Boot takes the first memory node of QEMU's DTB as its only RAM bank, and QEMU
        # lists the nodes highest first: without a third node U-Boot would run (and load
        # images) in the carve-out. Node 2 sits above the carve-out and is U-Boot's.
        extra = (
            [
                "-object",
                f"memory-backend-ram,id=ev-fwram,size={self.firmware_ram // (1 << 20)}M",
                "-numa",
                "node,nodeid=2,memdev=ev-fwram",
            ]
            if self.firmware_ram
            else []
        )
        return [
            "-m",
            f"{total // (1 << 20)}M",
            "-object",
            f"memory-backend-ram,id=ev-ram,size={s.ram // (1 << 20)}M",
            "-object",
            (
                f"memory-backend-file,id=ev-carveout,size={s.carveout // (1 << 20)}M,"
                f"mem-path={self.carveout_file},share=on"
            ),
            "-numa",
            "node,nodeid=0,memdev=ev-ram",
            "-numa",
            "node,nodeid=1,memdev=ev-carveout",
            *extra,
        ]

    def machine_args(self, extra_machine: str = "") -> list[str]:
        s = self.settings
        machine = s.machine + (f",{extra_machine}" if extra_machine else "")
        return qemu_base(machine, binary=s.binary, cpu=s.cpu, smp=s.smp, extra=self.memory_args())

    def device_args(self) -> list[str]:
        args = ["-global", "virtio-mmio.force-legacy=false"]
        for d in self.devices:
            opts = "".join(f",{k}={v}" for k, v in d.options.items())
            chardev = "".join(f",{k}={v}" for k, v in d.chardev_options.items())
            if d.kind == "virtio-net-device":  # net: a vhost-user netdev behind QEMU's NIC
                args += [
                    "-chardev",
                    f"socket,id={d.id},path={d.socket}{chardev}",
                    "-netdev",
                    f"vhost-user,id={d.id}-net,chardev={d.id}",
                    "-device",
                    f"virtio-net-device,netdev={d.id}-net,iommu_platform=on{opts}",
                ]
                continue
            args += [
                "-chardev",
                f"socket,id={d.id},path={d.socket}{chardev}",
                "-device",
                f"{d.kind},chardev={d.id},iommu_platform=on{opts}",
            ]
        if self.ivshmem_socket is not None:
            args += [
                "-chardev",
                f"socket,id=ev-ivshmem,path={self.ivshmem_socket}",
                "-device",
                "ivshmem-doorbell,chardev=ev-ivshmem,vectors=2",
            ]
        return args

    def boot_args(self) -> list[str]:
        if self.firmware is not None:
            return ["-bios", str(self.firmware)]
        if not (self.kernel and self.initrd and self.dtb):
            raise DeployError("QEMU direct boot needs kernel, initrd and dtb")
        return [
            "-kernel",
            str(self.kernel),
            "-initrd",
            str(self.initrd),
            "-dtb",
            str(self.dtb),
            "-append",
            self.append,
        ]

    def net_args(self) -> list[str]:
        if self.tftp_dir is None:
            return []
        # After the vhost-user devices: they keep the highest virtio-mmio slots.
        return [
            "-netdev",
            f"user,id=ev-net,tftp={self.tftp_dir}",
            "-device",
            "virtio-net-device,netdev=ev-net",
        ]

    def command(self) -> list[str]:
        if not self.console_socket and not self.console_device:
            raise DeployError("QEMU command needs a console socket or device")
        cmd = [
            *self.machine_args(),
            *self.device_args(),
            *self.net_args(),
            *self.boot_args(),
            "-no-reboot",
            # The console is a server that waits for us: no early boot output is lost.
            # A pty (for ser2net) cannot wait, so the machine starts paused (-S) instead.
            "-chardev",
            f"serial,id=ev-con,path={self.console_device}"
            if self.console_device
            else "pty,id=ev-con"
            if self.console_pty
            else f"socket,id=ev-con,path={self.console_socket},server=on,wait=on",
            "-serial",
            "chardev:ev-con",
            "-monitor",
            "none",
        ]
        if self.qmp_socket:
            cmd += ["-qmp", f"unix:{self.qmp_socket},server=on,wait=off"]
        if self.console_pty:
            cmd += ["-S"]
        return cmd


def virtio_mmio_slots(
    count: int, base: int = 0x0A000000, stride: int = 0x200, slots: int = 32
) -> list[int]:
    """Addresses of the virtio-mmio transports QEMU 7.2 gives the first ``count`` devices.

    virt creates 32 transports and a ``-device`` takes the highest free one first.
    """
    if count > slots:
        raise DeployError(f"{count} virtio-mmio devices requested, virt has {slots} slots")
    return [base + stride * (slots - 1 - i) for i in range(count)]


def check_binary(binary: str) -> str:
    path = shutil.which(binary)
    if not path:
        raise SetupError(f"{binary} not found", hint="run `make setup` (installs qemu-system-arm)")
    return path


def dump_dtb(config: QemuConfig, out: Path) -> bytes:
    """Have QEMU write the DTB it would give the guest with these machine options."""
    check_binary(config.settings.binary)
    out.unlink(missing_ok=True)
    # Devices are not needed: virt always creates all 32 virtio-mmio transports.
    cmd = config.machine_args(f"dumpdtb={out}")
    if config.firmware is not None:
        # With firmware virt leaves out devices (the pl061 GPIO): a node for a device QEMU
        # did not create crashes the guest, so dump the DTB of the machine that will run.
        cmd += ["-bios", str(config.firmware)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if not out.exists():
        raise DeployError(
            f"QEMU did not dump a DTB (exit {r.returncode}): {r.stderr.strip()[-500:]}"
        )
    # Compacted (a 1 MiB-padded DTB hangs the boot) and without this run's random seeds,
    # so two builds of the same machine give the same bytes.
    data = zero_boot_seeds(Fdt.from_bytes(out.read_bytes())).to_bytes()
    out.write_bytes(data)
    return data


class QemuProcess:
    """A running QEMU in its own process group, with its output in a log file."""

    def __init__(self, config: QemuConfig | list[str], log_path: Path) -> None:
        """Run ``config``'s virt command line, or a command line built elsewhere (a SoC
        model, :mod:`edgevirt.deploy.socmodel`)."""
        cmd = config.command() if isinstance(config, QemuConfig) else list(config)
        check_binary(cmd[0])
        self.log_path = log_path
        (log_path.parent / "qemu.cmdline").write_text(" ".join(cmd) + "\n")
        self._log = open(log_path, "wb")  # noqa: SIM115 - owned until stop()
        log.info("starting %s", " ".join(cmd))
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self) -> None:
        """Raise DeployError quoting QEMU's own words if it has exited."""
        if self.proc.poll() is not None:
            raise DeployError(
                f"QEMU exited with status {self.proc.returncode}: {self.output_tail()}"
            )

    def output_tail(self, n: int = 8) -> str:
        self._log.flush()
        return log_tail(self.log_path, n)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace: float = 5.0) -> int:
        """Terminate the whole process group; SIGKILL after ``grace`` seconds."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            if self.wait(grace) is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def log_tail(path: Path, n: int) -> str:
    """The last ``n`` lines of a child's log, joined for one error message."""
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(lines[-n:])


def wait_for_path(path: Path, timeout: float, what: str, alive: QemuProcess | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if alive is not None:
            alive.check_alive()
        if time.monotonic() >= deadline:
            raise DeployError(f"{what} ({path}) did not appear within {timeout:.0f}s")
        time.sleep(0.05)
