"""In-guest benchmark (DESIGN section 4): one QEMU virt guest (TCG, carve-out restricted) with
three disks on the same host file contents, measured in the same boot:

- vd? on QEMU's built-in ``virtio-blk-device`` (``iommu_platform=on``, also in the pool),
- vd? on ``vhost-user-blk`` served by ``qemu-storage-daemon``,
- vd? on ``vhost-user-blk`` served by ``edgevirt backend run`` (C request path).

The guest runs busybox ``dd`` (it has ``iflag=direct``/``oflag=direct``): 16 MiB sequential
read O_DIRECT in 64 KiB, 2048 x 4 KiB reads O_DIRECT, 16 MiB write + fsync. Times are taken
inside the guest (``date +%s%N`` around each dd), repeated and interleaved across the
disks; the median is reported with ratios. Run: ``.venv/bin/python bench/run.py --guest``.
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

from edgevirt.board import load_board
from edgevirt.console.expect import Console
from edgevirt.deploy.qemu import QemuConfig, QemuProcess, VhostUserDevice, wait_for_path
from edgevirt.image import initramfs as initramfs_mod
from edgevirt.image.kernel import build_kernel
from edgevirt.paths import images_dir
from edgevirt.up import BackendProcess, backend_socket, compose_dtb

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
BACKENDS = ["QEMU built-in", "qemu-storage-daemon", "edgevirt"]


class BenchConfig(QemuConfig):
    """The vhost-user disks, then QEMU's own virtio-blk on a -drive (read-only use of
    edgevirt.deploy.qemu: only device_args is extended)."""

    builtin_disk: Path | None = None

    def device_args(self) -> list[str]:
        args = super().device_args()
        if self.builtin_disk is not None:
            args += [
                "-drive", f"file={self.builtin_disk},if=none,format=raw,id=bi,cache=writeback",
                "-device", "virtio-blk-device,drive=bi,iommu_platform=on",
            ]  # fmt: skip
        return args


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


def run(build: Path | None = None) -> list[dict]:
    if not shutil.which("qemu-storage-daemon"):
        raise RuntimeError("qemu-storage-daemon not found (apt-get install qemu-system-common)")
    board = load_board("qemu-virt")
    kernel = build_kernel(None)
    tmp = Path(tempfile.mkdtemp(prefix="edgevirt-guestbench-")) if build is None else build
    shm = Path("/dev/shm") / f"edgevirt-bench-{os.getpid()}-{secrets.token_hex(4)}"
    socks = tmp / "sockets"
    socks.mkdir(parents=True, exist_ok=True)
    content = os.urandom(DISK)
    disks = {name: tmp / f"disk-{i}.img" for i, name in enumerate(BACKENDS)}
    for path in disks.values():
        path.write_bytes(content)
    qsd_sock = socks / "qsd.sock"
    ev_sock = backend_socket(socks, 0, "blk")
    devices = [VhostUserDevice("vhost-user-blk", qsd_sock, "vq"),
               VhostUserDevice("vhost-user-blk", ev_sock, "ve")]  # fmt: skip
    qcfg = BenchConfig(board.qemu, shm, devices)
    qcfg.builtin_disk = disks["QEMU built-in"]
    qsd = backend = qemu = console = None
    guest_clock = False
    try:
        src = images_dir() / "initramfs"
        initrd = tmp / "initramfs.cpio.gz"
        initramfs_mod.build_initramfs(
            initrd, busybox=initramfs_mod.fetch_busybox(), init_script=src / "init",
            extra_files={"/bin/edgevirt-agent": (src / "edgevirt-agent", 0o755)},
        )  # fmt: skip
        slots = [f"/virtio_mmio@{0x0A000000 + 0x200 * (31 - i):x}" for i in range(3)]
        qcfg.kernel, qcfg.initrd = kernel.image, initrd
        qcfg.dtb = compose_dtb(board, qcfg, tmp, True, slots)
        qsd = start_qsd(disks["qemu-storage-daemon"], qsd_sock, tmp / "qsd.log")
        backend = BackendProcess([f"blk:path={disks['edgevirt']}"], socks,
                                 tmp / "backend-stats.json", tmp / "backend.log")  # fmt: skip
        backend.wait_ready()
        wait_for_path(qsd_sock, 20, "qemu-storage-daemon socket")
        qcfg.console_socket = tmp / "console.sock"
        qcfg.append = f"console={board.console_kernel} panic=-1"
        qemu = QemuProcess(qcfg, tmp / "qemu.log")
        wait_for_path(qcfg.console_socket, 30, "QEMU console socket", qemu)
        console = Console.open(f"unix://{qcfg.console_socket}", log_path=tmp / "console.log")
        be, qm = backend, qemu

        def abort() -> None:
            be.check_healthy()
            qm.check_alive()

        console.expect(rb"EDGEVIRT-AGENT-READY[^\n]*\n", 120, abort)
        # Which /dev/vdX sits on which transport: the -device order gives the slots
        # (highest first): qsd, edgevirt, then the built-in disk.
        listing = console.run("ls -l /sys/block/", 10, abort).output
        where = dict(re.findall(r"([0-9a-f]+)\.virtio_mmio/virtio\d+/block/(vd[a-z])", listing))
        dev = {name: "/dev/" + where[slot.rsplit("@", 1)[1]]
               for name, slot in zip(["qemu-storage-daemon", "edgevirt", "QEMU built-in"],
                                     slots, strict=True)}  # fmt: skip
        probe = console.run(f"{NOW}", 10, abort).output.strip()
        guest_clock = probe.isdigit()
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(REPEAT):
            for wl, cmd in WORKLOADS:
                for name in BACKENDS:
                    ms = guest_ms(console, cmd.format(dev=dev[name]), abort, guest_clock)
                    times.setdefault((wl, name), []).append(ms)
        console.sendline("poweroff -f")
        qemu.wait(20)
    finally:
        if console is not None:
            console.close()
        if qemu is not None:
            qemu.stop()
        if backend is not None:
            backend.stop()
        if qsd is not None and qsd.poll() is None:
            os.killpg(qsd.pid, signal.SIGTERM)
            qsd.wait(10)
        shm.unlink(missing_ok=True)
        if build is None:
            shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    clock = "guest clock" if guest_clock else "host, console round trip"
    for wl, _ in WORKLOADS:
        med = {name: statistics.median(times[(wl, name)]) for name in BACKENDS}
        row: dict = {"guest workload": f"{wl} ({clock})"}
        row.update({f"{name} ms": f"{med[name]:.0f}" for name in BACKENDS})
        row["edgevirt/qsd"] = round(med["edgevirt"] / med["qemu-storage-daemon"], 2)
        row["edgevirt/built-in"] = round(med["edgevirt"] / med["QEMU built-in"], 2)
        row["qsd/built-in"] = round(med["qemu-storage-daemon"] / med["QEMU built-in"], 2)
        low = {name: min(times[(wl, name)]) for name in BACKENDS}
        row["min ms (built-in/qsd/edgevirt)"] = "/".join(f"{low[n]:.0f}" for n in BACKENDS)
        row["edgevirt/qsd (min)"] = round(low["edgevirt"] / low["qemu-storage-daemon"], 2)
        row["all runs ms (built-in; qsd; edgevirt)"] = "; ".join(
            "/".join(f"{t:.0f}" for t in times[(wl, name)]) for name in BACKENDS
        )
        rows.append(row)
    return rows
