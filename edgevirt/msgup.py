"""`up` over the virtio-msg transport: the same guest and smoke checks, no virtio-mmio.

The path: kernel (cached) → the ``virtio_msg`` module (``images/modules/virtio_msg``,
built against that kernel and checked: AArch64 ELF, vermagic = the kernel's release) →
initramfs with the module in ``/lib/modules`` (``/init`` loads it) → device tree: QEMU's
own plus an overlay with the carve-out's ``restricted-dma-pool`` and an
``edgevirt,virtio-msg`` bus node using it (devicetree/bindings/edgevirt,virtio-msg.yaml) →
the virtio-msg back-end process (ivshmem server + bus; it maps the carve-out file) → QEMU
``virt`` with ``-device ivshmem-doorbell,chardev=…,vectors=2 -nic none`` → smoke suite on
the console → power-off → host checks. :func:`up_msg` is what ``edgevirt up --transport
msg`` is meant to call.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from elftools.elf.elffile import ELFFile

from edgevirt.board import load_board
from edgevirt.console.expect import CommandResult, Console
from edgevirt.deploy.qemu import QemuConfig, QemuProcess, dump_dtb, wait_for_path
from edgevirt.devicetree import compose as dtcompose
from edgevirt.devicetree.fdt import Fdt, Node, Property, Ref
from edgevirt.errors import (
    BackendError,
    ConfigError,
    DeployError,
    EdgevirtError,
    ImageError,
    SetupError,
)
from edgevirt.image import initramfs as initramfs_mod
from edgevirt.image.kernel import CROSS, KernelBuild, build_kernel
from edgevirt.paths import images_dir
from edgevirt.report import Reporter
from edgevirt.smoke import Check, GuestCheck, guest_checks

log = logging.getLogger(__name__)

MODULE = "virtio_msg"
POOL_LABEL = "edgevirt_carveout"
BUS_NODE = "virtio-msg"
DEVICE_IDS = (2, 4)  # dev_num 0 = blk, 1 = rng, as the back-end is started below
RING_SLOTS = 64
SLOT_SIZE = 264


@dataclass
class MsgUpResult:
    board: str
    checks: list[Check] = field(default_factory=list)
    backend: dict = field(default_factory=dict)
    carveout: tuple[int, int] = (0, 0)
    error: str | None = None
    module: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.checks) and all(c.ok for c in self.checks)

    def to_json(self) -> dict:
        return {
            "board": self.board,
            "transport": "virtio-msg",
            "ok": self.ok,
            "error": self.error,
            "checks": [c.__dict__ for c in self.checks],
            "carveout": {"base": hex(self.carveout[0]), "size": self.carveout[1]},
            "module": self.module,
            "backend": self.backend,
            "seconds": self.seconds,
        }


# -- the guest kernel module ----------------------------------------------------------------


def module_source() -> Path:
    return images_dir() / "modules" / MODULE


def build_module(kb: KernelBuild, out: Path) -> Path:
    """Build ``virtio_msg.ko`` against ``kb``'s tree in a copy under ``out``; check it."""
    src = out / MODULE
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(module_source(), src, ignore=shutil.ignore_patterns(".*", "*.o", "*.ko"))
    cmd = ["make", "-C", str(kb.source), "ARCH=arm64", f"CROSS_COMPILE={CROSS}", f"M={src}"]
    r = subprocess.run([*cmd, "modules"], capture_output=True, text=True)
    (out / f"{MODULE}.build.log").write_text(r.stdout + r.stderr)
    ko = src / f"{MODULE}.ko"
    if r.returncode or not ko.exists():
        errors = [ln for ln in (r.stdout + r.stderr).splitlines() if "error" in ln.lower()]
        raise ImageError(f"module {MODULE} failed to build: " + " | ".join(errors[:5]))
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


# -- device tree ----------------------------------------------------------------------------


def bus_node(device_ids: tuple[int, ...] = DEVICE_IDS) -> Node:
    """The front-end's ``edgevirt,virtio-msg`` node for the ivshmem bus (see report notes:
    the doorbell and message memory come from the ivshmem PCI device, so the binding's
    ``reg``, ``interrupts`` and ``msg-ring`` region do not apply)."""
    node = Node(BUS_NODE)
    node.set(Property.from_string("compatible", "edgevirt,virtio-msg"))
    node.set(Property.from_u32("memory-region", Ref(POOL_LABEL)))
    node.set(Property.from_strings("memory-region-names", ["dma"]))
    node.set(Property.empty("dma-coherent"))
    node.set(Property.from_string("edgevirt,role", "frontend"))
    node.set(Property.from_u32("edgevirt,device-count", len(device_ids)))
    node.set(Property.from_u32("edgevirt,device-ids", *device_ids))
    node.set(Property.from_u32("edgevirt,ring-slots", RING_SLOTS))
    node.set(Property.from_u32("edgevirt,slot-size", SLOT_SIZE))
    return node


def compose_msg_dtb(qcfg: QemuConfig, build: Path) -> Path:
    """QEMU's DTB for this topology + the carve-out pool + the virtio-msg bus node."""
    raw = dump_dtb(qcfg, build / "qemu-virt.raw.dtb")
    base = Fdt.from_bytes(raw)
    s = qcfg.settings
    overlay = dtcompose.compose_carveout(base, s.carveout_base, s.carveout, [], name=POOL_LABEL)
    overlay.add_fragment("/").add_child(bus_node())
    overlay.description = f"edgevirt carve-out and virtio-msg bus (devices {DEVICE_IDS})"
    return Path(dtcompose.write_outputs(base, overlay, build, "guest")["dtb"])


class MsgQemuConfig(QemuConfig):
    """QEMU with the ivshmem-doorbell device whose server is the back-end."""

    ivshmem_socket: Path | None = None

    def device_args(self) -> list[str]:
        if self.ivshmem_socket is None:
            raise DeployError("virtio-msg QEMU needs the back-end's ivshmem socket")
        return [
            "-chardev",
            f"socket,id=ev-ivshmem,path={self.ivshmem_socket}",
            "-device",
            "ivshmem-doorbell,chardev=ev-ivshmem,vectors=2",
        ]


# -- back-end process -----------------------------------------------------------------------


class MsgBackendProcess:
    """``python -m edgevirt.backend.transport.virtio_msg`` as a child, observed by stats."""

    def __init__(
        self, socket: Path, carveout: Path, base: int, devices: list[str], build: Path
    ) -> None:
        self.stats_path = build / "backend-stats.json"
        self.log_path = build / "backend.log"
        self.stats_path.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "edgevirt.backend.transport.virtio_msg", "--socket",
               str(socket), "--carveout-file", str(carveout), "--carveout-base", hex(base),
               "--stats", str(self.stats_path)]  # fmt: skip
        for d in devices:
            cmd += ["--device", d]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            self._log.flush()
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise BackendError(
                f"virtio-msg back-end exited with status {self.proc.returncode}: "
                + " | ".join(tail)
            )

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.stats_path.exists():
            self.check_alive()
            if time.monotonic() >= deadline:
                raise BackendError(f"back-end did not start within {timeout:.0f}s")
            time.sleep(0.05)

    def stats(self) -> dict:
        try:
            return dict(json.loads(self.stats_path.read_text()))
        except (OSError, ValueError):
            return {}

    def check_healthy(self) -> None:
        self.check_alive()
        for dev in self.stats().get("devices", []):
            if dev.get("broken"):
                raise BackendError("back-end refused the guest: " + "; ".join(dev["broken"]))

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


# -- checks ---------------------------------------------------------------------------------


def msg_pool_judge(base: int, size: int) -> GuestCheck:
    """The pool sits exactly on the carve-out and is assigned to the virtio-msg bus node."""

    def judge(res: CommandResult) -> tuple[bool, str]:
        created = re.search(
            r"created restricted DMA pool at (0x[0-9a-f]+), size (\d+) MiB", res.output
        )
        if not created:
            return False, "kernel did not log 'created restricted DMA pool'"
        at, mib = int(created.group(1), 16), int(created.group(2))
        if (at, mib << 20) != (base, size):
            return False, f"pool at {at:#x} ({mib} MiB), expected {base:#x} ({size >> 20} MiB)"
        if not re.search(rf"edgevirt-virtio-msg {BUS_NODE}: assigned reserved memory", res.output):
            return False, f"pool not assigned to the {BUS_NODE} node"
        devices = re.findall(r"virtio-msg: device (\d+): virtio id (\d+)", res.output)
        if len(devices) != len(DEVICE_IDS):
            return False, f"virtio-msg registered {devices}, expected {len(DEVICE_IDS)} devices"
        if "MSI-X" not in res.output:
            return False, "virtio-msg bus is not using MSI-X"
        return True, (
            f"pool at {at:#x} ({mib} MiB) assigned to {BUS_NODE}; devices "
            + ", ".join(f"{n}=id {i}" for n, i in devices)
            + " over MSI-X"
        )

    return GuestCheck(
        "virtio-msg bus and restricted DMA pool",
        "dmesg | grep -E 'restricted DMA pool|reserved memory|virtio-msg'",
        judge,
    )


def msg_checks(base: int, size: int) -> list[GuestCheck]:
    """The virtio-mmio smoke suite with the pool check swapped for the bus's."""
    suite = [g for g in guest_checks(base, size, []) if g.name != "restricted DMA pool"]
    return [suite[0], msg_pool_judge(base, size), *suite[1:]]


def host_checks(disk: Path, disk_out: str | None, stats: dict, carveout: int) -> list[Check]:
    import hashlib

    from edgevirt.smoke import DISK_TEST_BYTES

    checks = []
    if disk_out is not None:
        hashes = re.findall(r"^([0-9a-f]{64})\b", disk_out, re.M)
        with open(disk, "rb") as f:
            host = hashlib.sha256(f.read(DISK_TEST_BYTES)).hexdigest()
        ok = bool(hashes) and hashes[0] == host
        verdict = "matches the guest" if ok else "differs from the guest"
        checks.append(Check("disk image on host", ok, f"host sha256 {host[:16]}… {verdict}"))
    for d in stats.get("devices", []):
        ok = (
            d.get("mapped_bytes") == carveout
            and d.get("refused") == 0
            and d.get("requests", 0) > 0
            and not d.get("broken")
        )
        checks.append(Check(f"back-end {d['device']} (virtio-msg dev {d['dev_num']})", ok,
                            f"mapped {d.get('mapped_bytes', 0):#x} bytes (carve-out "
                            f"{carveout:#x}), {d.get('requests', 0)} requests, "
                            f"{d.get('refused')} refused, broken {d.get('broken')}"))  # fmt: skip
    errors = stats.get("protocol_errors", 0)
    detail = (
        f"{stats.get('messages_in', 0)} messages in, {stats.get('messages_out', 0)} out, "
        f"{errors} discarded, {stats.get('dropped', 0)} dropped"
    )
    checks.append(Check("virtio-msg protocol", bool(stats) and errors == 0, detail))
    return checks


# -- the whole path -------------------------------------------------------------------------


@dataclass
class GuestImage:
    kernel: KernelBuild
    module: Path
    initrd: Path
    dtb: Path


def prepare_guest(qcfg: MsgQemuConfig, build: Path, reporter: Reporter) -> GuestImage:
    """Kernel, module, initramfs and DTB, set into ``qcfg`` (with a console socket)."""
    reporter.step("kernel: build or reuse the cached one")
    kb = build_kernel(progress=reporter.progress)
    reporter.step(f"module: {MODULE} against {kb.release}")
    ko = build_module(kb, build)
    reporter.step("initramfs: busybox + /init + agent + virtio_msg.ko")
    src = images_dir() / "initramfs"
    initrd = build / "initramfs.cpio.gz"
    initramfs_mod.build_initramfs(
        initrd,
        busybox=initramfs_mod.fetch_busybox(),
        init_script=src / "init",
        extra_files={
            "/bin/edgevirt-agent": (src / "edgevirt-agent", 0o755),
            f"/lib/modules/{MODULE}.ko": (ko, 0o644),
        },
    )
    reporter.step("device tree: carve-out pool + edgevirt,virtio-msg bus node")
    dtb = compose_msg_dtb(qcfg, build)
    qcfg.kernel, qcfg.initrd, qcfg.dtb = kb.image, initrd, dtb
    qcfg.console_socket = build / "console.sock"
    qcfg.console_socket.unlink(missing_ok=True)
    return GuestImage(kb, ko, initrd, dtb)


def up_msg(
    build_dir: Path,
    *,
    board: str = "qemu-virt",
    disk_size: int = 64 << 20,
    boot_timeout: float = 120.0,
    reporter: Reporter | None = None,
) -> MsgUpResult:
    reporter = reporter or Reporter()
    t0 = time.monotonic()
    b = load_board(board)
    build = build_dir.resolve()
    build.mkdir(parents=True, exist_ok=True)
    s = b.qemu
    result = MsgUpResult(board=b.name, carveout=(s.carveout_base, s.carveout))
    shm = Path("/dev/shm") / f"edgevirt-msg-{os.getpid()}-{secrets.token_hex(4)}"
    sock = build / "ivshmem.sock"
    qcfg = MsgQemuConfig(s, shm)
    qcfg.ivshmem_socket = sock
    backend: MsgBackendProcess | None = None
    qemu: QemuProcess | None = None
    console: Console | None = None
    try:
        guest = prepare_guest(qcfg, build, reporter)
        result.module = {"path": str(guest.module), **module_info(guest.module)}
        disk = build / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(disk_size)
        with open(shm, "wb") as f:  # QEMU's memory-backend-file uses it as it is
            f.truncate(s.carveout)
        reporter.step("back-end: virtio-msg bus (ivshmem server) with blk + rng")
        backend = MsgBackendProcess(sock, shm, s.carveout_base, [f"blk:path={disk}", "rng"], build)
        backend.wait_ready()
        qcfg.append = f"console={b.console_kernel} panic=-1"
        reporter.step("QEMU: booting " + b.name + " with ivshmem-doorbell")
        qemu = QemuProcess(qcfg, build / "qemu.log")
        assert qcfg.console_socket is not None
        wait_for_path(qcfg.console_socket, 30, "QEMU console socket", qemu)
        console = Console.open(f"unix://{qcfg.console_socket}", log_path=build / "console.log")
        be, qm = backend, qemu

        def abort() -> None:
            be.check_healthy()
            qm.check_alive()

        console.expect(rb"EDGEVIRT-AGENT-READY[^\n]*\n", boot_timeout, abort)
        reporter.step("smoke suite over the serial console")
        outputs: dict[str, str] = {}
        for gc in msg_checks(s.carveout_base, s.carveout):
            res = console.run(gc.command, gc.timeout, abort)
            outputs[gc.name] = res.output
            ok, detail = gc.judge(res)
            result.checks.append(Check(gc.name, ok, detail))
        reporter.step("power-off")
        console.sendline("poweroff -f")
        if qemu.wait(20) is None:
            raise DeployError("guest did not power off within 20s")
        backend.stop()
        result.backend = backend.stats()
        result.checks += host_checks(
            disk, outputs.get("blk write/read-back"), result.backend, s.carveout
        )
    except (SetupError, ConfigError):
        raise
    except EdgevirtError as e:
        result.error = str(e) + (f" (hint: {e.hint})" if e.hint else "")
    finally:
        if console is not None:
            console.close()
        if qemu is not None:
            qemu.stop()
        if backend is not None:
            backend.stop()
            result.backend = result.backend or backend.stats()
        shm.unlink(missing_ok=True)
        result.seconds = time.monotonic() - t0
        (build / "result.json").write_text(json.dumps(result.to_json(), indent=2))
    return result
