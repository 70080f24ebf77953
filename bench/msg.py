"""In-guest benchmark over virtio-msg (issue 7): the DESIGN section 4 workload on one QEMU virt
guest (TCG, carve-out restricted) with three disks of the same contents, in the same boot:

- vd? on ``vhost-user-blk`` served by ``qemu-storage-daemon``,
- vd? on ``vhost-user-blk`` served by ``edgevirt backend run`` (vhost-user, C request path),
- vd? on the virtio-msg bus: ``virtio_msg.ko`` over an ``ivshmem-doorbell`` device (message
  memory in BAR2, doorbell register, MSI-X), served by ``edgevirt backend run --transport
  msg`` (the ivshmem server; it maps only the carve-out file).

One restricted-dma-pool over the carve-out serves all three: the two virtio-mmio nodes and
the ``edgevirt,virtio-msg`` bus node reference it. The commands, the guest clock and the
checks are :mod:`bench.guest`'s; repetitions are interleaved over the three disks so host
load hits them alike. Run: ``.venv/bin/python bench/run.py --guest-msg [--guest-keep DIR]``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.guest import NOW, WORKLOADS, guest_ms, start_qsd
from edgevirt.backend.transport.virtio_msg.channel import DEFAULT_SLOTS, SLOT_SIZE
from edgevirt.board import load_board
from edgevirt.console.expect import Console
from edgevirt.deploy.qemu import QemuConfig, QemuProcess, VhostUserDevice, dump_dtb, wait_for_path
from edgevirt.devicetree import compose as dtcompose
from edgevirt.devicetree.fdt import Fdt, Node, Property, Ref
from edgevirt.image import initramfs as initramfs_mod
from edgevirt.image.kernel import build_kernel
from edgevirt.image.modules import build_modules
from edgevirt.paths import images_dir

DISK = 32 << 20
REPEAT = 9
BACKENDS = ["qemu-storage-daemon", "edgevirt vhost-user", "edgevirt virtio-msg"]
VIRTIO_BLK = 2
POOL_LABEL = "edgevirt_carveout"


class MsgBenchConfig(QemuConfig):
    """The two vhost-user disks (read-only use of edgevirt.deploy.qemu), then the
    ivshmem-doorbell device whose server is the virtio-msg back-end."""

    bus_socket: Path | None = None

    def device_args(self) -> list[str]:
        args = super().device_args()
        if self.bus_socket is not None:
            args += [
                "-chardev", f"socket,id=bench-ivshmem,path={self.bus_socket}",
                "-device", "ivshmem-doorbell,chardev=bench-ivshmem,vectors=2",
            ]  # fmt: skip
        return args


class Backend:
    """``edgevirt backend run ...`` as a child with its output in a log, ready when its
    stats file appears."""

    def __init__(self, args: list[str], stats: Path, log: Path) -> None:
        self.stats, self.log = stats, log
        stats.unlink(missing_ok=True)
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgevirt", "backend", "run", *args, "--stats", str(stats)],
                stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.stats.exists():
            self.check()
            if time.monotonic() > deadline:
                raise RuntimeError(f"back-end not ready in {timeout:.0f}s: see {self.log}")
            time.sleep(0.05)

    def check(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"back-end exited ({self.proc.returncode}): " + " | ".join(tail))
        try:
            data = json.loads(self.stats.read_text())
        except (OSError, ValueError):
            return
        broken = [b for d in data.get("devices", []) for b in d.get("broken", [])]
        if broken:
            raise RuntimeError("back-end refused the guest: " + "; ".join(broken))

    def final(self) -> dict:
        try:
            return dict(json.loads(self.stats.read_text()))
        except (OSError, ValueError):
            return {}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def bus_node(device_ids: tuple[int, ...]) -> Node:
    """The front-end's bus node per devicetree/bindings/edgevirt,virtio-msg.yaml, as
    edgevirt.msgup writes it for the ivshmem bus (message memory and doorbells come from the
    ivshmem PCI device; slots as the back-end lays them out)."""
    node = Node("virtio-msg")
    node.set(Property.from_string("compatible", "edgevirt,virtio-msg"))
    node.set(Property.from_u32("memory-region", Ref(POOL_LABEL)))
    node.set(Property.from_strings("memory-region-names", ["dma"]))
    node.set(Property.empty("dma-coherent"))
    node.set(Property.from_string("edgevirt,role", "frontend"))
    node.set(Property.from_u32("edgevirt,device-count", len(device_ids)))
    node.set(Property.from_u32("edgevirt,device-ids", *device_ids))
    node.set(Property.from_u32("edgevirt,ring-slots", DEFAULT_SLOTS))
    node.set(Property.from_u32("edgevirt,slot-size", SLOT_SIZE))
    return node


def compose(qcfg: QemuConfig, out: Path, mmio_slots: list[str]) -> Path:
    """virt's DTB + the carve-out pool on the two virtio-mmio nodes and the virtio-msg bus."""
    base = Fdt.from_bytes(dump_dtb(qcfg, out / "qemu-virt.raw.dtb"))
    s = qcfg.settings
    overlay = dtcompose.compose_carveout(
        base, s.carveout_base, s.carveout, mmio_slots, name=POOL_LABEL
    )
    overlay.add_fragment("/").add_child(bus_node((VIRTIO_BLK,)))
    overlay.description = "bench: carve-out pool on two virtio-mmio nodes and a virtio-msg bus"
    return Path(dtcompose.write_outputs(base, overlay, out, "guest")["dtb"])


def run(build: Path | None = None, repeat: int = REPEAT) -> list[dict]:
    if not shutil.which("qemu-storage-daemon"):
        raise RuntimeError("qemu-storage-daemon not found (apt-get install qemu-system-common)")
    board = load_board("qemu-virt")
    kernel = build_kernel(None)
    tmp = Path(tempfile.mkdtemp(prefix="edgevirt-msgbench-")) if build is None else build
    tmp.mkdir(parents=True, exist_ok=True)
    shm = Path("/dev/shm") / f"edgevirt-msgbench-{os.getpid()}-{secrets.token_hex(4)}"
    socks = tmp / "sockets"
    socks.mkdir(parents=True, exist_ok=True)
    content = os.urandom(DISK)
    disks = {name: tmp / f"disk-{i}.img" for i, name in enumerate(BACKENDS)}
    for path in disks.values():
        path.write_bytes(content)
    qsd_sock, vu_sock, bus_sock = socks / "qsd.sock", socks / "0-blk.sock", socks / "ivshmem.sock"
    devices = [VhostUserDevice("vhost-user-blk", qsd_sock, "vq"),
               VhostUserDevice("vhost-user-blk", vu_sock, "ve")]  # fmt: skip
    qcfg = MsgBenchConfig(board.qemu, shm, devices)
    qcfg.bus_socket = bus_sock
    # -device order gives the virtio-mmio slots, highest first: qsd, then edgevirt.
    slots = [f"/virtio_mmio@{0x0A000000 + 0x200 * (31 - i):x}" for i in range(2)]
    qsd: subprocess.Popen | None = None
    vu = msg = None
    qemu = console = None
    guest_clock = False
    times: dict[tuple[str, str], list[float]] = {}
    try:
        (built,) = build_modules(kernel, [images_dir() / "modules" / "virtio_msg"])
        ko = built.ko
        src = images_dir() / "initramfs"
        initrd = tmp / "initramfs.cpio.gz"
        initramfs_mod.build_initramfs(
            initrd, busybox=initramfs_mod.fetch_busybox(), init_script=src / "init",
            extra_files={"/bin/edgevirt-agent": (src / "edgevirt-agent", 0o755),
                         f"/lib/modules/{ko.name}": (ko, 0o644)},
        )  # fmt: skip
        qcfg.kernel, qcfg.initrd = kernel.image, initrd
        qcfg.dtb = compose(qcfg, tmp, slots)
        with open(shm, "wb") as f:  # the carve-out: QEMU's memory-backend-file and our mapping
            f.truncate(board.qemu.carveout)
        qsd = start_qsd(disks["qemu-storage-daemon"], qsd_sock, tmp / "qsd.log")
        vu = Backend(["--device", f"blk:path={disks['edgevirt vhost-user']}", "--socket-dir",
                      str(socks)], tmp / "vu-stats.json", tmp / "vu.log")  # fmt: skip
        msg = Backend(["--transport", "msg", "--device", f"blk:path={disks['edgevirt virtio-msg']}",
                       "--ivshmem-socket", str(bus_sock), "--carveout-file", str(shm),
                       "--carveout-base", hex(board.qemu.carveout_base)],
                      tmp / "msg-stats.json", tmp / "msg.log")  # fmt: skip
        vu.wait_ready()
        msg.wait_ready()
        wait_for_path(qsd_sock, 20, "qemu-storage-daemon socket")
        qcfg.console_socket = tmp / "console.sock"
        qcfg.append = f"console={board.console_kernel} panic=-1"
        qemu = QemuProcess(qcfg, tmp / "qemu.log")
        wait_for_path(qcfg.console_socket, 30, "QEMU console socket", qemu)
        console = Console.open(f"unix://{qcfg.console_socket}", log_path=tmp / "console.log")
        backends, qm = (vu, msg), qemu

        def abort() -> None:
            for b in backends:
                b.check()
            qm.check_alive()

        console.expect(rb"EDGEVIRT-AGENT-READY[^\n]*\n", 120, abort)
        listing = console.run("ls -l /sys/block/", 10, abort).output
        mmio = dict(re.findall(r"([0-9a-f]+)\.virtio_mmio/virtio\d+/block/(vd[a-z])", listing))
        dev = {name: "/dev/" + mmio[slot.rsplit("@", 1)[1]]
               for name, slot in zip(BACKENDS[:2], slots, strict=True)}  # fmt: skip
        others = set(re.findall(r"block/(vd[a-z])", listing)) - set(mmio.values())
        if len(others) != 1:
            raise RuntimeError(f"expected one virtio-msg disk besides {mmio}: {listing[-800:]}")
        dev["edgevirt virtio-msg"] = "/dev/" + others.pop()
        probe = console.run(NOW, 10, abort).output.strip()
        guest_clock = probe.isdigit()
        for _ in range(repeat):
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
        for b in (vu, msg):
            if b is not None:
                b.stop()
        if qsd is not None and qsd.poll() is None:
            os.killpg(qsd.pid, signal.SIGTERM)
            qsd.wait(10)
        shm.unlink(missing_ok=True)
        if build is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return rows(times, guest_clock)


def rows(times: dict[tuple[str, str], list[float]], guest_clock: bool) -> list[dict]:
    out = []
    clock = "guest clock" if guest_clock else "host, console round trip"
    q, v, m = BACKENDS
    for wl, _ in WORKLOADS:
        med = {name: statistics.median(times[(wl, name)]) for name in BACKENDS}
        low = {name: min(times[(wl, name)]) for name in BACKENDS}
        row: dict = {"guest workload": f"{wl} ({clock})"}
        row.update({f"{name} ms": f"{med[name]:.0f}" for name in BACKENDS})
        row["msg/vhost-user"] = round(med[m] / med[v], 2)
        row["msg/qsd"] = round(med[m] / med[q], 2)
        row["vhost-user/qsd"] = round(med[v] / med[q], 2)
        row["min ms (qsd/vu/msg)"] = "/".join(f"{low[n]:.0f}" for n in BACKENDS)
        row["msg/vhost-user (min)"] = round(low[m] / low[v], 2)
        row["all runs ms (qsd; vu; msg)"] = "; ".join(
            "/".join(f"{t:.0f}" for t in times[(wl, name)]) for name in BACKENDS
        )
        out.append(row)
    return out
