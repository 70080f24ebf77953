"""In-guest benchmark over virtio-msg (issue 7): the DESIGN section 4 workload on one QEMU virt
guest (TCG, carve-out restricted) with three disks of the same contents, in the same boot:

- vd? on ``vhost-user-blk`` served by ``qemu-storage-daemon``,
- vd? on ``vhost-user-blk`` served by ``edgevirt backend run`` (vhost-user, C request path),
- vd? on the virtio-msg bus: ``virtio_msg.ko`` over an ``ivshmem-doorbell`` device (message
  memory in BAR2, doorbell register, MSI-X), served by the virtio-msg back-end as ``up``
  runs it (the ivshmem server; it maps only the carve-out file).

One restricted-dma-pool over the carve-out serves all three: the two virtio-mmio nodes and
the ``edgevirt,virtio-msg`` bus node reference it. The workloads, the guest clock and the
checks are :mod:`bench.inguest`'s; repetitions are interleaved over the three disks so host
load hits them alike. Run: ``.venv/bin/python bench/run.py --guest-msg [--guest-keep DIR]``.
"""

from __future__ import annotations

import re
from pathlib import Path

from bench.inguest import MMIO_DISK, REPEAT, BenchConfig, GuestBench, rows
from edgevirt.backend.transport.virtio_msg.channel import DEFAULT_SLOTS, SLOT_SIZE
from edgevirt.deploy.backend_process import IvshmemBus
from edgevirt.deploy.machine import mmio_nodes
from edgevirt.deploy.qemu import QemuConfig, VhostUserDevice, dump_dtb
from edgevirt.devicetree import compose as dtcompose
from edgevirt.devicetree.fdt import Fdt, Node, Property, Ref
from edgevirt.image.modules import build_modules
from edgevirt.paths import images_dir

BACKENDS = ["qemu-storage-daemon", "edgevirt vhost-user", "edgevirt virtio-msg"]
VIRTIO_BLK = 2
POOL_LABEL = "edgevirt_carveout"


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
    with GuestBench("msgbench", build, BACKENDS) as gb:
        vu_sock, bus_sock = gb.socks / "0-blk.sock", gb.socks / "ivshmem.sock"
        devices = [VhostUserDevice("vhost-user-blk", gb.qsd_sock, "vq"),
                   VhostUserDevice("vhost-user-blk", vu_sock, "ve")]  # fmt: skip
        qcfg = BenchConfig(gb.board.qemu, gb.shm, devices)
        # the ivshmem-doorbell device whose server is the virtio-msg back-end
        qcfg.extra = (
            "-chardev", f"socket,id=bench-ivshmem,path={bus_sock}",
            "-device", "ivshmem-doorbell,chardev=bench-ivshmem,vectors=2",
        )  # fmt: skip
        # -device order gives the virtio-mmio slots, highest first: qsd, then edgevirt.
        slots = mmio_nodes(2)
        (built,) = build_modules(gb.kernel, [images_dir() / "modules" / "virtio_msg"])
        ko = built.ko
        qcfg.kernel = gb.kernel.image
        qcfg.initrd = gb.initramfs({f"/lib/modules/{ko.name}": (ko, 0o644)})
        qcfg.dtb = compose(qcfg, gb.tmp, slots)
        with open(gb.shm, "wb") as f:  # the carve-out: QEMU's memory-backend-file and our mapping
            f.truncate(gb.board.qemu.carveout)
        gb.start_qsd("qemu-storage-daemon")
        gb.start_backend("edgevirt vhost-user", "vu", gb.socks)
        bus = IvshmemBus(bus_sock, gb.shm, gb.board.qemu.carveout_base)
        gb.start_backend("edgevirt virtio-msg", "msg", None, msg=bus)
        gb.boot(qcfg)
        listing, dev = gb.block_devices(slots, BACKENDS[:2])
        mmio = dict(MMIO_DISK.findall(listing))
        others = set(re.findall(r"block/(vd[a-z])", listing)) - set(mmio.values())
        if len(others) != 1:
            raise RuntimeError(f"expected one virtio-msg disk besides {mmio}: {listing[-800:]}")
        dev["edgevirt virtio-msg"] = "/dev/" + others.pop()
        times = gb.measure(dev, repeat)
    return rows(
        times, gb.guest_clock, BACKENDS, ["qsd", "vu", "msg"],
        [("msg/vhost-user", "edgevirt virtio-msg", "edgevirt vhost-user"),
         ("msg/qsd", "edgevirt virtio-msg", "qemu-storage-daemon"),
         ("vhost-user/qsd", "edgevirt vhost-user", "qemu-storage-daemon")],
        ("msg/vhost-user (min)", "edgevirt virtio-msg", "edgevirt vhost-user"), gb.cpu,
    )  # fmt: skip
