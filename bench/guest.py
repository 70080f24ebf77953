"""In-guest benchmark (DESIGN section 4): one QEMU virt guest (TCG, carve-out restricted) with
three disks on the same host file contents, measured in the same boot:

- vd? on QEMU's built-in ``virtio-blk-device`` (``iommu_platform=on``, also in the pool),
- vd? on ``vhost-user-blk`` served by ``qemu-storage-daemon``,
- vd? on ``vhost-user-blk`` served by ``edgevirt backend run`` (C request path).

The workloads, the guest clock and the checks are :mod:`bench.inguest`'s. Run:
``.venv/bin/python bench/run.py --guest``.
"""

from __future__ import annotations

from pathlib import Path

from bench.inguest import REPEAT, BenchConfig, GuestBench, rows
from edgevirt.deploy.backend_process import backend_socket
from edgevirt.deploy.machine import compose_dtb, mmio_nodes
from edgevirt.deploy.qemu import VhostUserDevice

BACKENDS = ["QEMU built-in", "qemu-storage-daemon", "edgevirt"]


def run(build: Path | None = None) -> list[dict]:
    with GuestBench("guestbench", build, BACKENDS) as gb:
        ev_sock = backend_socket(gb.socks, 0, "blk")
        devices = [VhostUserDevice("vhost-user-blk", gb.qsd_sock, "vq"),
                   VhostUserDevice("vhost-user-blk", ev_sock, "ve")]  # fmt: skip
        qcfg = BenchConfig(gb.board.qemu, gb.shm, devices)
        qcfg.extra = (
            "-drive", f"file={gb.disks['QEMU built-in']},if=none,format=raw,id=bi,cache=writeback",
            "-device", "virtio-blk-device,drive=bi,iommu_platform=on",
        )  # fmt: skip
        # Which /dev/vdX sits on which transport: the -device order gives the slots
        # (highest first): qsd, edgevirt, then the built-in disk.
        slots = mmio_nodes(3)
        qcfg.kernel, qcfg.initrd = gb.kernel.image, gb.initramfs()
        qcfg.dtb = compose_dtb(gb.board, qcfg, gb.tmp, True, slots)
        gb.start_qsd("qemu-storage-daemon")
        gb.start_backend("edgevirt", "backend", gb.socks)
        gb.boot(qcfg)
        _, dev = gb.block_devices(slots, ["qemu-storage-daemon", "edgevirt", "QEMU built-in"])
        times = gb.measure(dev, REPEAT)
    return rows(
        times, gb.guest_clock, BACKENDS, ["built-in", "qsd", "edgevirt"],
        [("edgevirt/qsd", "edgevirt", "qemu-storage-daemon"),
         ("edgevirt/built-in", "edgevirt", "QEMU built-in"),
         ("qsd/built-in", "qemu-storage-daemon", "QEMU built-in")],
        ("edgevirt/qsd (min)", "edgevirt", "qemu-storage-daemon"), gb.cpu,
    )  # fmt: skip
