"""What the in-guest benchmarks share (:mod:`bench.guest`, :mod:`bench.msg`): one QEMU virt
guest (TCG, carve-out restricted) with one disk per back-end, all of the same contents,
measured in the same boot.

The guest runs busybox ``dd`` (it has ``iflag=direct``/``oflag=direct``): 16 MiB sequential
read O_DIRECT in 64 KiB, 2048 x 4 KiB reads O_DIRECT, 16 MiB write + fsync. Times are taken
inside the guest (the monotonic clock around each dd), repeated and interleaved across the
disks so host load hits them alike; the median is reported with ratios.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from bench.blk import cpu_ns
from edgevirt.board import load_board
from edgevirt.console.expect import Console
from edgevirt.deploy.backend_process import BackendProcess, IvshmemBus
from edgevirt.deploy.qemu import QemuConfig, QemuProcess, wait_for_path
from edgevirt.image import initramfs as initramfs_mod
from edgevirt.image.kernel import build_kernel
from edgevirt.paths import images_dir

DISK = 32 << 20
REPEAT = 9
WORKLOADS = [
    ("16 MiB sequential read, O_DIRECT, 64 KiB",
     "dd if={dev} of=/dev/null bs=64k count=256 iflag=direct"),
    ("2048 x 4 KiB read, O_DIRECT", "dd if={dev} of=/dev/null bs=4k count=2048 iflag=direct"),
    ("16 MiB write + fsync", "dd if=/dev/zero of={dev} bs=64k count=256 conv=fsync"),
]  # fmt: skip
#: The guest's monotonic clock in ns (busybox date has no %N): "now at N nsecs".
NOW = "sed -n 's/^now at \\([0-9]*\\) nsecs$/\\1/p' /proc/timer_list"
#: "<slot>.virtio_mmio/virtioN/block/vdX" in ``ls -l /sys/block/``.
MMIO_DISK = re.compile(r"([0-9a-f]+)\.virtio_mmio/virtio\d+/block/(vd[a-z])")


class BenchConfig(QemuConfig):
    """The vhost-user disks (read-only use of edgevirt.deploy.qemu: only device_args is
    extended), then ``extra`` devices QEMU serves itself or connects elsewhere."""

    extra: tuple[str, ...] = ()

    def device_args(self) -> list[str]:
        return super().device_args() + list(self.extra)


def start_qsd(disk: Path, sock: Path, log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen(
            ["qemu-storage-daemon",
             "--blockdev", f"driver=file,node-name=f,filename={disk},cache.direct=off",
             "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,"
             f"addr.path={sock},writable=on,num-queues=1"],
            stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def guest_ms(console: Console, cmd: str, abort: object, guest_clock: bool) -> float:
    """Time ``cmd`` with the guest's clock, or (without one) the console round trip."""
    count = re.search(r"count=(\d+)", cmd)
    want = f"{count.group(1) if count else ''}+0 records out"
    if not guest_clock:
        r = console.run(f"{cmd} 2>&1", 120, abort)  # type: ignore[arg-type]
        ms = r.seconds * 1e3
        ok = r.status == 0
    else:
        r = console.run(f"a=$({NOW}); {cmd} 2>/tmp/dd.err; s=$?; b=$({NOW}); cat /tmp/dd.err; "
                        "echo $s $((b - a))", 120, abort)  # type: ignore[arg-type]  # fmt: skip
        status, ns = r.output.strip().splitlines()[-1].split()
        ok, ms = status == "0", int(ns) / 1e6
    if not ok or want not in r.output:  # dd ran to the end, every block transferred
        raise RuntimeError(f"guest command failed: {cmd}: {r.output[-300:]}")
    return ms


class GuestBench:
    """One benchmark boot: the work directory with one disk per back-end in ``names`` (the
    same random contents), the carve-out file's name, and what it starts — the
    qemu-storage-daemon, edgevirt back-ends, QEMU, the console — all stopped on exit."""

    def __init__(self, prefix: str, build: Path | None, names: list[str]) -> None:
        if not shutil.which("qemu-storage-daemon"):
            raise RuntimeError("qemu-storage-daemon not found (apt-get install qemu-system-common)")
        self.board = load_board("qemu-virt")
        self.kernel = build_kernel(None)
        self.keep = build is not None
        self.tmp = (
            build if build is not None else Path(tempfile.mkdtemp(prefix=f"edgevirt-{prefix}-"))
        )
        self.shm = Path("/dev/shm") / f"edgevirt-{prefix}-{os.getpid()}-{secrets.token_hex(4)}"
        self.socks = self.tmp / "sockets"
        self.socks.mkdir(parents=True, exist_ok=True)
        self.qsd_sock = self.socks / "qsd.sock"
        content = os.urandom(DISK)
        self.names = names
        self.disks = {name: self.tmp / f"disk-{i}.img" for i, name in enumerate(names)}
        for path in self.disks.values():
            path.write_bytes(content)
        self.qsd: subprocess.Popen | None = None
        #: Each disk's server process: its CPU per workload run is measured beside the time.
        self.pids: dict[str, int] = {}
        #: (workload, disk) -> the server's CPU ms in each run (user + system, all threads).
        self.cpu: dict[tuple[str, str], list[float]] = {}
        self.backends: list[BackendProcess] = []
        self.qemu: QemuProcess | None = None
        self.console: Console | None = None
        self.guest_clock = False

    def __enter__(self) -> GuestBench:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.console is not None:
            self.console.close()
        if self.qemu is not None:
            self.qemu.stop()
        for b in self.backends:
            b.stop()
        if self.qsd is not None and self.qsd.poll() is None:
            os.killpg(self.qsd.pid, signal.SIGTERM)
            self.qsd.wait(10)
        self.shm.unlink(missing_ok=True)
        if not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def initramfs(self, extra_files: dict[str, tuple[Path, int]] | None = None) -> Path:
        """busybox, /init and the agent (plus ``extra_files``: guest path → (file, mode))."""
        src = images_dir() / "initramfs"
        initrd = self.tmp / "initramfs.cpio.gz"
        initramfs_mod.build_initramfs(
            initrd, busybox=initramfs_mod.fetch_busybox(), init_script=src / "init",
            extra_files={"/bin/edgevirt-agent": (src / "edgevirt-agent", 0o755),
                         **(extra_files or {})},
        )  # fmt: skip
        return initrd

    def start_qsd(self, name: str) -> None:
        self.qsd = start_qsd(self.disks[name], self.qsd_sock, self.tmp / "qsd.log")
        self.pids[name] = self.qsd.pid

    def start_backend(
        self, disk: str, name: str, socket_dir: Path | None, msg: IvshmemBus | None = None
    ) -> None:
        """An edgevirt back-end serving the disk of ``disk``, logs as ``<name>.log``."""
        self.backends.append(
            b := BackendProcess(
                [f"blk:path={self.disks[disk]}"],
                socket_dir,
                self.tmp / f"{name}-stats.json",
                self.tmp / f"{name}.log",
                msg=msg,
            )  # fmt: skip
        )
        self.pids[disk] = b.proc.pid

    def boot(self, qcfg: QemuConfig) -> None:
        """Once every back-end is ready: QEMU, its console, the agent's ready line."""
        for b in self.backends:
            b.wait_ready()
        wait_for_path(self.qsd_sock, 20, "qemu-storage-daemon socket")
        qcfg.console_socket = self.tmp / "console.sock"
        qcfg.append = f"console={self.board.console_kernel} panic=-1"
        self.qemu = QemuProcess(qcfg, self.tmp / "qemu.log")
        wait_for_path(qcfg.console_socket, 30, "QEMU console socket", self.qemu)
        self.console = Console.open(
            f"unix://{qcfg.console_socket}", log_path=self.tmp / "console.log"
        )
        self.console.expect(rb"EDGEVIRT-AGENT-READY[^\n]*\n", 120, self.abort)

    def abort(self) -> None:
        for b in self.backends:
            b.check_healthy()
        assert self.qemu is not None
        self.qemu.check_alive()

    def block_devices(self, slots: list[str], names: list[str]) -> tuple[str, dict[str, str]]:
        """``ls -l /sys/block/`` and the /dev node of each of ``names`` on the virtio-mmio
        ``slots`` (DT paths, in the same order)."""
        assert self.console is not None
        listing = self.console.run("ls -l /sys/block/", 10, self.abort).output
        where = dict(MMIO_DISK.findall(listing))
        dev = {name: "/dev/" + where[slot.rsplit("@", 1)[1]]
               for name, slot in zip(names, slots, strict=True)}  # fmt: skip
        return listing, dev

    def measure(self, dev: dict[str, str], repeat: int) -> dict[tuple[str, str], list[float]]:
        """Every workload on every disk, ``repeat`` times interleaved; then power-off."""
        console = self.console
        assert console is not None and self.qemu is not None
        probe = console.run(NOW, 10, self.abort).output.strip()
        self.guest_clock = probe.isdigit()
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(repeat):
            for wl, cmd in WORKLOADS:
                for name in self.names:
                    pid = self.pids.get(name)  # QEMU's built-in disk: no server process
                    c0 = cpu_ns(pid) if pid else 0
                    ms = guest_ms(console, cmd.format(dev=dev[name]), self.abort, self.guest_clock)
                    times.setdefault((wl, name), []).append(ms)
                    if pid:
                        spent = (cpu_ns(pid) - c0) / 1e6
                        self.cpu.setdefault((wl, name), []).append(spent)
        console.sendline("poweroff -f")
        self.qemu.wait(20)
        return times


def rows(
    times: dict[tuple[str, str], list[float]],
    guest_clock: bool,
    names: list[str],
    short: list[str],
    ratios: list[tuple[str, str, str]],
    min_ratio: tuple[str, str, str],
    cpu: dict[tuple[str, str], list[float]] | None = None,
) -> list[dict]:
    """One row per workload: the median per back-end, ``ratios`` (column, numerator,
    denominator) of medians, the minima, ``min_ratio`` of minima, every run (``short``
    names the back-ends in the column titles), and with ``cpu`` each server's median CPU
    per run: how much of a difference in time the back-ends' own work explains."""
    out = []
    clock = "guest clock" if guest_clock else "host, console round trip"
    for wl, _ in WORKLOADS:
        med = {name: statistics.median(times[(wl, name)]) for name in names}
        low = {name: min(times[(wl, name)]) for name in names}
        row: dict = {"guest workload": f"{wl} ({clock})"}
        row.update({f"{name} ms": f"{med[name]:.0f}" for name in names})
        row.update({col: round(med[a] / med[b], 2) for col, a, b in ratios})
        row[f"min ms ({'/'.join(short)})"] = "/".join(f"{low[n]:.0f}" for n in names)
        col, a, b = min_ratio
        row[col] = round(low[a] / low[b], 2)
        row[f"all runs ms ({'; '.join(short)})"] = "; ".join(
            "/".join(f"{t:.0f}" for t in times[(wl, name)]) for name in names
        )
        if cpu:
            row[f"server CPU ms ({'/'.join(short)})"] = "/".join(
                f"{statistics.median(cpu[(wl, n)]):.1f}" if (wl, n) in cpu else "-" for n in names
            )
        out.append(row)
    return out
