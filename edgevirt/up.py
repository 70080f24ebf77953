"""`edgevirt up`: the whole path on QEMU virt, each step a library function.

device tree → kernel + initramfs → back-end process → QEMU → smoke suite on the console →
power-off → report. Every process started here is stopped here, on success or failure.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgevirt.board import Board, load_board
from edgevirt.console.expect import CommandResult, Console
from edgevirt.deploy.qemu import (
    QemuConfig,
    QemuProcess,
    VhostUserDevice,
    dump_dtb,
    virtio_mmio_slots,
    wait_for_path,
)
from edgevirt.devicetree import compose as dtcompose
from edgevirt.devicetree.fdt import Fdt
from edgevirt.errors import BackendError, ConfigError, DeployError, EdgevirtError, SetupError
from edgevirt.image import initramfs as initramfs_mod
from edgevirt.image.kernel import KernelBuild, build_kernel
from edgevirt.paths import images_dir
from edgevirt.report import Reporter
from edgevirt.smoke import DISK_TEST_BYTES, Check, GuestCheck, guest_checks

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


@dataclass
class UpOptions:
    build_dir: Path
    board: str = "qemu-virt"
    restrict: bool = True
    disk_size: int = 64 << 20
    boot_timeout: float = 120.0
    kernel_fragment: Path | None = None


@dataclass
class UpResult:
    board: str
    restrict: bool
    checks: list[Check] = field(default_factory=list)
    backend: dict = field(default_factory=dict)
    carveout: tuple[int, int] = (0, 0)
    error: str | None = None
    artefacts: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.checks) and all(c.ok for c in self.checks)

    def to_json(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        d["carveout"] = {"base": hex(self.carveout[0]), "size": self.carveout[1]}
        return d


# -- steps ----------------------------------------------------------------------------------


def build_initramfs(out: Path, reporter: Reporter) -> Path:
    reporter.step("initramfs: busybox (arm64) + /init + agent")
    busybox = initramfs_mod.fetch_busybox()
    src = images_dir() / "initramfs"
    initramfs_mod.build_initramfs(
        out,
        busybox=busybox,
        init_script=src / "init",
        extra_files={"/bin/edgevirt-agent": (src / "edgevirt-agent", 0o755)},
    )
    return out


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


def backend_socket(socket_dir: Path, index: int, name: str) -> Path:
    """Socket naming shared by `backend run --socket-dir` and its launchers."""
    return socket_dir / f"{index}-{name}.sock"


class BackendProcess:
    """`edgevirt backend run` as a child process, observed through its stats file."""

    def __init__(self, devices: list[str], socket_dir: Path, stats: Path, log_path: Path) -> None:
        self.stats_path = stats
        stats.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "edgevirt",
            "backend",
            "run",
            "--socket-dir",
            str(socket_dir),
            "--stats",
            str(stats),
            "--log-level",
            "info",
        ]
        for d in devices:
            cmd += ["--device", d]
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.log_path = log_path
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.stats_path.exists():
            self.check_alive()
            if time.monotonic() >= deadline:
                raise BackendError(
                    f"back-end did not start within {timeout:.0f}s; see {self.log_path}"
                )
            time.sleep(0.05)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            self._log.flush()
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise BackendError(
                f"back-end exited with status {self.proc.returncode}: " + " | ".join(tail)
            )

    def stats(self) -> dict:
        try:
            return json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return {}

    def check_healthy(self) -> None:
        """Raise as soon as the back-end has refused a queue: the guest would only hang."""
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


def run_smoke(
    console: Console,
    suite: list[GuestCheck],
    abort: Callable[[], None],
    results: dict[str, CommandResult],
) -> list[Check]:
    checks = []
    for gc in suite:
        res = console.run(gc.command, gc.timeout, abort)
        results[gc.name] = res
        ok, detail = gc.judge(res)
        checks.append(Check(gc.name, ok, detail))
    return checks


def host_checks(
    result: UpResult, disk: Path, disk_result: CommandResult | None, stats: dict
) -> list[Check]:
    checks = []
    if disk_result is not None:
        hashes = re.findall(r"^([0-9a-f]{64})\b", disk_result.output, re.M)
        with open(disk, "rb") as f:
            host = hashlib.sha256(f.read(DISK_TEST_BYTES)).hexdigest()
        ok = bool(hashes) and hashes[0] == host
        checks.append(
            Check(
                "disk image on host",
                ok,
                f"host sha256 of first 8 MiB {host[:16]}… "
                + ("matches the guest" if ok else "differs from the guest"),
            )
        )
    base, size = result.carveout
    devs = stats.get("devices", [])
    for d in devs:
        mapped, refused = d.get("mapped_bytes", 0), d.get("refused", 0)
        ok = mapped == size and refused == 0 and d.get("requests", 0) > 0 and not d.get("broken")
        checks.append(
            Check(
                f"back-end {d['device']}",
                ok,
                f"mapped {mapped:#x} bytes (carve-out {size:#x}), {d.get('requests', 0)} requests, "
                f"{refused} refused" + (f", broken: {d['broken']}" if d.get("broken") else ""),
            )
        )
    if not devs:
        checks.append(Check("back-end", False, "no statistics from the back-end"))
    return checks


def up(opts: UpOptions, reporter: Reporter | None = None) -> UpResult:
    reporter = reporter or Reporter()
    t0 = time.monotonic()
    board = load_board(opts.board)
    build = opts.build_dir.resolve()
    build.mkdir(parents=True, exist_ok=True)
    result = UpResult(
        board=board.name,
        restrict=opts.restrict,
        carveout=(board.qemu.carveout_base, board.qemu.carveout),
    )
    shm = Path("/dev/shm") / f"edgevirt-{os.getpid()}-{secrets.token_hex(4)}"
    sock_dir = build / "sockets"
    sock_dir.mkdir(exist_ok=True)
    devices = [("blk", "vhost-user-blk"), ("rng", "vhost-user-rng")]
    qemu_devices = [
        VhostUserDevice(kind, backend_socket(sock_dir, i, name), f"vu{i}")
        for i, (name, kind) in enumerate(devices)
    ]
    qcfg = QemuConfig(board.qemu, shm, qemu_devices)
    backend: BackendProcess | None = None
    qemu: QemuProcess | None = None
    console: Console | None = None
    try:
        reporter.step("kernel: build or reuse the cached one")
        kb: KernelBuild = build_kernel(opts.kernel_fragment, progress=reporter.progress)
        initrd = build_initramfs(build / "initramfs.cpio.gz", reporter)
        slots = virtio_mmio_slots(len(devices))
        nodes = [f"/virtio_mmio@{a:x}" for a in slots]
        reporter.step(
            "device tree: "
            + (
                "carve-out overlay on " + ", ".join(nodes)
                if opts.restrict
                else "QEMU's own (restriction off)"
            )
        )
        dtb = compose_dtb(board, qcfg, build, opts.restrict, nodes)
        disk = build / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(opts.disk_size)
        reporter.step("back-end: vhost-user-blk + vhost-user-rng")
        backend = BackendProcess(
            [f"blk:path={disk}", "rng"],
            sock_dir,
            build / "backend-stats.json",
            build / "backend.log",
        )
        backend.wait_ready()
        qcfg.kernel, qcfg.initrd, qcfg.dtb = kb.image, initrd, dtb
        qcfg.console_socket = build / "console.sock"
        qcfg.qmp_socket = build / "qmp.sock"
        qcfg.append = f"console={board.console_kernel} panic=-1"
        qcfg.console_socket.unlink(missing_ok=True)
        reporter.step("QEMU: booting " + board.name)
        qemu = QemuProcess(qcfg, build / "qemu.log")
        wait_for_path(qcfg.console_socket, 30, "QEMU console socket", qemu)
        console = Console.open(f"unix://{qcfg.console_socket}", log_path=build / "console.log")
        be, qm = backend, qemu

        def abort() -> None:
            be.check_healthy()
            qm.check_alive()

        console.expect(rb"EDGEVIRT-AGENT-READY[^\n]*\n", opts.boot_timeout, abort)
        reporter.step("smoke suite over the serial console")
        results: dict[str, CommandResult] = {}
        suite = guest_checks(board.qemu.carveout_base, board.qemu.carveout, nodes)
        result.checks += run_smoke(console, suite, abort, results)
        reporter.step("power-off")
        console.sendline("poweroff -f")
        if qemu.wait(20) is None:
            raise DeployError("guest did not power off within 20s")
        backend.stop()
        stats = backend.stats()
        result.backend = stats
        result.checks += host_checks(result, disk, results.get("blk write/read-back"), stats)
    except (SetupError, ConfigError):
        raise  # the host or an input file is at fault, not the target: exit codes 3 and 4
    except EdgevirtError as e:
        result.error = str(e)
        if e.hint:
            result.error += f" (hint: {e.hint})"
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
        result.artefacts = {p.name: str(p) for p in sorted(build.iterdir()) if p.is_file()}
        (build / "result.json").write_text(json.dumps(result.to_json(), indent=2))
    return result
