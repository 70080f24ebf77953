"""Compose a system spec onto a board: one overlay per VM, every input checked first.

Front-end VM overlay (fragments target paths, or the root; labels are referenced with
``&label`` so the .dtbo carries ``__symbols__``/``__fixups__``/``__local_fixups__``):

* ``/reserved-memory``: per carve-out a ``restricted-dma-pool`` (no ``no-map``: Linux's
  swiotlb refuses it) or ``shared-dma-pool`` (``no-map``), label ``edgevirt_<name>``; per
  virtio-msg bus a ``virtio-msg-ring@…`` region (``no-map``, label ``edgevirt_<vm>_ring``).
* virtio-mmio devices: ``memory-region = <&edgevirt_<carveout>>`` on the existing node, or
  on real boards (a VMM traps the window) a new ``virtio_mmio@<address>`` node with an SPI
  from the board's free range.
* virtio-msg devices: one bus node, compatible ``edgevirt,virtio-msg`` (binding:
  ``devicetree/bindings/edgevirt,virtio-msg.yaml``). With an MMIO doorbell
  (``[msg] doorbell = <address>``) it is ``virtio-msg@<doorbell>`` with ``reg``,
  ``interrupts`` and the message ring as second ``memory-region``. With
  ``doorbell = "ivshmem-pci"`` an ivshmem-doorbell PCI device brings doorbells and message
  memory, so the node is ``virtio-msg`` with ``edgevirt,doorbell = "ivshmem-pci"``, the
  carve-out pool as its only ``memory-region``, and no ring is taken off the carve-out:
  exactly what ``images/modules/virtio_msg`` binds to.

Service VM overlay: the same physical carve-outs and rings as ``no-map`` reserved regions
(its back-end maps exactly them) and, for message devices, the bus node with role backend.

The interrupt controller is referenced by label when the base has ``__symbols__`` (kernel
DTBs built with ``-@``), else by its phandle value (QEMU's DTB has no labels).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from edgevirt.board import Board
from edgevirt.devicetree.compose import _compatible, _reg, virtio_mmio_nodes
from edgevirt.devicetree.fdt import Fdt, Node, Property, Ref
from edgevirt.devicetree.irq import (
    IRQ_TYPE_EDGE_RISING,
    InterruptController,
    find_interrupt_controller,
    used_spis,
)
from edgevirt.devicetree.lint import check_base
from edgevirt.devicetree.memmap import MemoryMap, Region, fmt_range, highest_free, memory_map
from edgevirt.devicetree.overlay import Overlay
from edgevirt.errors import DeviceTreeError
from edgevirt.spec import IVSHMEM_PCI, Carveout, Device, SystemSpec

__all__ = ["Placed", "SystemPlan", "compose_system", "MSG_COMPATIBLE", "MIN_RESTRICTED_POOL"]

MSG_COMPATIBLE = "edgevirt,virtio-msg"
VIRTIO_MMIO_SIZE = 0x200
#: swiotlb allocates in segments of IO_TLB_SEGSIZE (128) slabs of 2 KiB.
MIN_RESTRICTED_POOL = 128 * 2048
QEMU_SLOTS = (0x0A000000, 0x200, 32)  # virt's virtio-mmio transports: base, stride, count


@dataclass(frozen=True)
class Placed:
    """A region the composer placed: carve-out or message ring."""

    kind: str  # carveout | msg-ring
    name: str
    label: str
    base: int
    size: int
    vm: str
    pool: str = ""
    auto: bool = False
    pool_size: int = 0  # carve-out minus the message ring at its top (0: the whole size)

    @property
    def node_size(self) -> int:
        return self.pool_size or self.size

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "label": self.label,
            "base": hex(self.base),
            "size": hex(self.size),
            "vm": self.vm,
            "pool": self.pool,
            "placement": "top of carve-out"
            if self.kind == "msg-ring"
            else ("auto" if self.auto else "fixed"),
            "pool_size": hex(self.node_size),
        }


@dataclass
class SystemPlan:
    """What compose_system decided, and the overlays it built (per VM name)."""

    board: str
    spec: str
    memory: MemoryMap
    placed: list[Placed] = field(default_factory=list)
    mmio: dict[int, str] = field(default_factory=dict)  # device index -> node path
    spis: dict[str, int] = field(default_factory=dict)  # node path -> SPI number
    msg_nodes: dict[str, str] = field(default_factory=dict)  # front-end VM -> bus node path
    overlays: dict[str, Overlay] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "board": self.board,
            "spec": self.spec,
            "placed": [p.to_json() for p in self.placed],
            "mmio": {str(k): v for k, v in self.mmio.items()},
            "spis": self.spis,
            "msg_nodes": self.msg_nodes,
            "vms": sorted(self.overlays),
        }


def _check_carveout(mm: MemoryMap, c: Carveout, base: int, where: str) -> None:
    what = f"{where}: carve-out {c.name!r} {fmt_range(base, c.size)}"
    if base % c.align or c.size % c.align:
        raise DeviceTreeError(
            f"{what}: base and size must be aligned to {c.align:#x} (align), as the "
            f"kernel's {c.pool} needs page-aligned, whole-granule memory"
        )
    if c.pool == "restricted-dma-pool" and c.size < MIN_RESTRICTED_POOL:
        raise DeviceTreeError(
            f"{what}: a restricted-dma-pool needs at least {MIN_RESTRICTED_POOL:#x} bytes "
            "(one swiotlb segment of 128 x 2 KiB slabs)"
        )
    if mm.ram_containing(base, c.size) is None:
        have = "; ".join(fmt_range(r.base, r.size) for r in mm.ram)
        raise DeviceTreeError(f"{what} is not inside one RAM range; RAM: {have}")
    hits = mm.conflicts(base, c.size)
    if hits:
        raise DeviceTreeError(
            f"{what} overlaps " + "; ".join(f"{h.kind} {h.describe()}" for h in hits)
        )


def _place(mm: MemoryMap, spec: SystemSpec, c: Carveout, board: Board) -> Placed:
    where = spec.where("[[carveout]]")
    if c.placement is None:
        base = highest_free(mm, c.size, c.align)
        if base is None:
            raise DeviceTreeError(
                f"{where}: no free {c.align:#x}-aligned range of {c.size:#x} bytes for "
                f"carve-out {c.name!r} in the RAM of {board.name}"
            )
    else:
        base = c.placement
    _check_carveout(mm, c, base, where)
    mm.added.append(Region("carveout", base, c.size, c.label, c.pool))
    return Placed("carveout", c.name, c.label, base, c.size, c.vm, c.pool, c.placement is None)


class _Spis:
    """Hands out SPIs from the board's free range, refusing any already in use."""

    def __init__(self, board: Board, used: dict[int, list[str]]) -> None:
        self.board, self.used = board, used
        self.next = board.dt.spi_range[0] if board.dt.spi_range else None

    def take(self, for_what: str) -> int:
        rng = self.board.dt.spi_range
        if rng is None or self.next is None:
            raise DeviceTreeError(
                f"{self.board.where('dt')}: {for_what} needs an interrupt, but the board "
                "has no spi_range (free GIC SPIs for new nodes)"
            )
        while self.next <= rng[1]:
            spi, self.next = self.next, self.next + 1
            if spi in self.used:
                raise DeviceTreeError(
                    f"{self.board.where('dt')}.spi_range: SPI {spi} ({spi + 32:#x} as INTID) "
                    f"is already used by {', '.join(self.used[spi][:3])} (duplicate interrupt)"
                )
            self.used[spi] = [for_what]
            return spi
        raise DeviceTreeError(
            f"{self.board.where('dt')}.spi_range: [{rng[0]}, {rng[1]}] has no SPI left "
            f"for {for_what}"
        )


def _gic_ref(gic: InterruptController) -> int | Ref:
    return Ref(gic.label) if gic.label else gic.phandle


def compose_system(board: Board, base: Fdt, spec: SystemSpec) -> SystemPlan:
    """Check the spec against board and base tree; build one overlay per VM."""
    check_base(base)
    mm = memory_map(board, base)
    plan = SystemPlan(board.name, spec.name, mm)
    fixed = [c for c in spec.carveouts if c.placement is not None]
    for c in fixed + [c for c in spec.carveouts if c.placement is None]:  # fixed ones first
        plan.placed.append(_place(mm, spec, c, board))
    by_name = {p.name: p for p in plan.placed}
    gic = find_interrupt_controller(base, board.dt.interrupt_controller)
    spis = _Spis(board, used_spis(base, gic) if gic.is_gic else {})
    root_ac, root_sc = base.cells("/")

    # Message rings: one per front-end VM with msg devices, at the top of the carve-out
    # those devices use, so a back-end that maps the carve-out sees rings and buffers.
    msg_vms = [
        v.name
        for v in spec.frontends
        if any(d.transport == "msg" and d.vm == v.name for d in spec.devices)
    ]
    rings: dict[str, Placed] = {}
    for i, fe in enumerate(msg_vms):
        assert spec.msg is not None
        _msg_carveout(spec, fe)
        if spec.msg.doorbell is None:
            continue  # ivshmem-pci: message memory and doorbells come with the PCI device
        rings[fe] = _ring(spec, plan, fe)
        for side in range(2):
            db = spec.msg.doorbell + (2 * i + side) * spec.msg.doorbell_size
            _check_window(base, mm, db, spec.msg.doorbell_size, spec.where("[msg].doorbell"))
            mm.added.append(Region("doorbell", db, spec.msg.doorbell_size, f"{fe} doorbell {side}"))

    def msg_node(ov: Overlay, fe: str, role: str) -> None:
        """The bus node of front-end ``fe``'s msg devices, as seen from ``role``'s side."""
        devs = [d for d in spec.devices if d.transport == "msg" and d.vm == fe]
        _msg_node(ov, spec, plan, spis, gic, root_ac, root_sc, fe, devs, rings, by_name,
                  msg_vms.index(fe), role)  # fmt: skip

    mmio_devices = [d for d in spec.devices if d.transport == "mmio"]
    _assign_mmio(board, base, mmio_devices, plan, mm)

    for vm in spec.frontends:
        ov = Overlay(description=f"edgevirt {spec.name}: front-end VM {vm.name} on {board.name}")
        holder, ac, sc = _reserved_holder(base, ov, root_ac, root_sc)
        for p in plan.placed:
            if p.vm != vm.name:
                continue
            node = holder.add_child(Node(_pool_node_name(p), labels=[p.label]))
            if p.kind == "carveout":
                node.set(Property.from_string("compatible", p.pool))
            node.set(Property.from_cells("reg", [(p.base, p.node_size)], ac, sc))
            if p.kind == "msg-ring" or p.pool == "shared-dma-pool":
                node.set(Property.empty("no-map"))
        for d in mmio_devices:
            if d.vm != vm.name:
                continue
            label = by_name[d.carveout].label
            path = plan.mmio[d.index]
            if d.address is None:
                ov.add_fragment(path).set(Property.from_u32("memory-region", Ref(label)))
            else:
                spi = spis.take(path)
                plan.spis[path] = spi
                new = _root_overlay(ov).add_child(Node(path.lstrip("/")))
                new.set(Property.from_string("compatible", "virtio,mmio"))
                new.set(
                    Property.from_cells("reg", [(d.address, VIRTIO_MMIO_SIZE)], root_ac, root_sc)
                )
                new.set(Property.from_u32("interrupt-parent", _gic_ref(gic)))
                new.set(Property.from_u32("interrupts", 0, spi, IRQ_TYPE_EDGE_RISING))
                new.set(Property.from_u32("memory-region", Ref(label)))
                new.set(Property.empty("dma-coherent"))
        if vm.name in msg_vms:
            msg_node(ov, vm.name, "frontend")
        plan.overlays[vm.name] = ov

    for vm in spec.services:
        ov = Overlay(description=f"edgevirt {spec.name}: service VM {vm.name} on {board.name}")
        holder, ac, sc = _reserved_holder(base, ov, root_ac, root_sc)
        for p in plan.placed:
            node = holder.add_child(Node(f"edgevirt-{p.kind}@{p.base:x}", labels=[p.label]))
            node.set(Property.from_cells("reg", [(p.base, p.node_size)], ac, sc))
            node.set(Property.empty("no-map"))
            node.set(Property.from_string("edgevirt,peer", p.vm))
        for fe in msg_vms:
            msg_node(ov, fe, "backend")
        plan.overlays[vm.name] = ov
    return plan


def _msg_carveout(spec: SystemSpec, vm: str) -> str:
    """The one carve-out the VM's msg devices use (one bus has one DMA pool)."""
    names = list(
        dict.fromkeys(d.carveout for d in spec.devices if d.transport == "msg" and d.vm == vm)
    )
    if len(names) != 1:
        raise DeviceTreeError(
            f"{spec.where('[[device]]')}: the virtio-msg devices of VM {vm!r} use carve-outs "
            f"{', '.join(names)}; one bus has one DMA pool"
        )
    return names[0]


def _ring(spec: SystemSpec, plan: SystemPlan, vm: str) -> Placed:
    """Take the message ring off the top of the carve-out the VM's msg devices use."""
    assert spec.msg is not None
    name = _msg_carveout(spec, vm)
    idx = next(i for i, p in enumerate(plan.placed) if p.kind == "carveout" and p.name == name)
    co = plan.placed[idx]
    size = spec.msg.ring_bytes
    if co.pool == "restricted-dma-pool" and co.size - size < MIN_RESTRICTED_POOL:
        raise DeviceTreeError(
            f"{spec.where('[msg]')}: the {size:#x}-byte message ring leaves carve-out "
            f"{co.name!r} ({co.size:#x}) less than {MIN_RESTRICTED_POOL:#x} for its pool"
        )
    plan.placed[idx] = replace(co, pool_size=co.size - size)
    ring = Placed(
        "msg-ring", f"{vm}_ring", f"edgevirt_{vm}_ring", co.base + co.size - size, size, vm
    )
    plan.placed.append(ring)
    plan.memory.added.append(Region("msg-ring", ring.base, size, ring.label, f"top of {co.name}"))
    return ring


def _pool_node_name(p: Placed) -> str:
    stem = {"restricted-dma-pool": "restricted-dma", "shared-dma-pool": "shared-dma"}
    return f"{stem.get(p.pool, 'virtio-msg-ring')}@{p.base:x}"


def _root_overlay(ov: Overlay) -> Node:
    """The ``__overlay__`` of the fragment targeting ``/`` (created first, on demand)."""
    for frag in ov.fragments:
        tp = frag.get("target-path")
        if tp is not None and tp.value == b"/\0":
            return frag.children["__overlay__"]
    return ov.add_fragment("/")


def _reserved_holder(base: Fdt, ov: Overlay, ac: int, sc: int) -> tuple[Node, int, int]:
    """Where pool nodes go: a new /reserved-memory, or a fragment on the existing one."""
    rmem = base.root.child("reserved-memory")
    if rmem is None:
        holder = _root_overlay(ov).add_child(Node("reserved-memory"))
        holder.set(Property.from_u32("#address-cells", ac))
        holder.set(Property.from_u32("#size-cells", sc))
        holder.set(Property.empty("ranges"))
        return holder, ac, sc
    rac, rsc = base.cells("/reserved-memory")
    return ov.add_fragment("/reserved-memory"), rac, rsc


def _check_window(base: Fdt, mm: MemoryMap, addr: int, size: int, where: str) -> None:
    """An MMIO window edgevirt adds must hit neither RAM nor another root-level device."""
    for r in mm.ram:
        if r.overlaps(addr, size):
            raise DeviceTreeError(f"{where}: {fmt_range(addr, size)} lies in RAM {r.describe()}")
    for r in mm.added:
        if r.overlaps(addr, size):
            raise DeviceTreeError(f"{where}: {fmt_range(addr, size)} overlaps {r.describe()}")
    for path, a, s in _device_windows(base):
        if a < addr + size and addr < a + s:
            raise DeviceTreeError(
                f"{where}: {fmt_range(addr, size)} overlaps {path} {fmt_range(a, s)}"
            )


def _device_windows(base: Fdt) -> list[tuple[str, int, int]]:
    """``reg`` windows of every node reachable through identity (empty) ``ranges``: their
    addresses are CPU physical addresses. Subtrees behind translating ranges are skipped."""
    out: list[tuple[str, int, int]] = []

    def visit(path: str, node: Node) -> None:
        for name, child in node.children.items():
            cpath = path.rstrip("/") + "/" + name
            if child.get("device_type") is None and name != "reserved-memory":
                out.extend((cpath, a, s) for a, s in _reg_or_empty(base, cpath, child))
            ranges = child.get("ranges")
            if ranges is not None and not ranges.value and name != "reserved-memory":
                visit(cpath, child)

    visit("/", base.root)
    return out


def _reg_or_empty(base: Fdt, path: str, node: Node) -> list[tuple[int, int]]:
    try:
        return _reg(base, path, node)
    except DeviceTreeError:
        return []


def _assign_mmio(
    board: Board, base: Fdt, devices: list[Device], plan: SystemPlan, mm: MemoryMap
) -> None:
    """Which node each mmio device uses. QEMU fills its slots from the top in -device
    order, so unnamed devices get the highest slots, in spec order."""
    existing = {v.path: v for v in virtio_mmio_nodes(base)}
    taken: set[str] = set()
    qemu_slot = QEMU_SLOTS[2] - 1
    for d in devices:
        w = f"[[device]][{d.index}] ({d.type})"
        if d.address is not None:
            if board.dt.kind == "qemu-dumpdtb":
                raise DeviceTreeError(
                    f"{w}: address {d.address:#x}: QEMU {board.qemu.machine} creates no "
                    "virtio-mmio node there (a node for a device QEMU did not create crashes "
                    "the guest)",
                    hint="omit address to use virt's own virtio_mmio nodes",
                )
            path = f"/virtio_mmio@{d.address:x}"
            _check_window(base, mm, d.address, VIRTIO_MMIO_SIZE, w)
            mm.added.append(Region("mmio", d.address, VIRTIO_MMIO_SIZE, path))
        elif d.node is not None:
            node = base.find(d.node)
            if node is None or "virtio,mmio" not in _compatible(node):
                made = "the QEMU machine does not create" if board.is_qemu else "the base has no"
                raise DeviceTreeError(
                    f"{w}: node {d.node!r}: {made} such virtio,mmio node",
                    hint=f"{len(existing)} virtio,mmio nodes exist"
                    + (f", e.g. {next(iter(existing))}" if existing else ""),
                )
            path = base.path_of(node)
        elif board.dt.kind == "qemu-dumpdtb":
            b, stride, _ = QEMU_SLOTS
            while qemu_slot >= 0 and f"/virtio_mmio@{b + stride * qemu_slot:x}" in taken:
                qemu_slot -= 1
            path = f"/virtio_mmio@{b + stride * qemu_slot:x}"
            qemu_slot -= 1
            if path not in existing:
                raise DeviceTreeError(f"{w}: QEMU machine does not create {path}")
        else:
            raise DeviceTreeError(
                f"{w}: transport 'mmio' on {board.name} needs node = <existing virtio,mmio "
                "path> or address = <MMIO window the VMM traps>"
            )
        if path in taken:
            raise DeviceTreeError(f"{w}: node {path} is used by two devices")
        if d.address is None and base.get(path).get("memory-region") is not None:
            raise DeviceTreeError(f"{w}: {path} already has a memory-region")
        taken.add(path)
        plan.mmio[d.index] = path


def _msg_node(
    ov: Overlay,
    spec: SystemSpec,
    plan: SystemPlan,
    spis: _Spis,
    gic: InterruptController,
    ac: int,
    sc: int,
    vm: str,
    devices: list[Device],
    rings: dict[str, Placed],
    by_name: dict[str, Placed],
    bus: int,
    role: str,
) -> None:
    assert spec.msg is not None
    m = spec.msg
    pool = Ref(by_name[devices[0].carveout].label)
    if m.doorbell is None:  # ivshmem-pci: the PCI device is doorbell and message memory
        name = "virtio-msg" if role == "frontend" else f"virtio-msg-{vm}"
        node = _root_overlay(ov).add_child(Node(name))
        node.set(Property.from_string("compatible", MSG_COMPATIBLE))
        node.set(Property.from_string("edgevirt,doorbell", IVSHMEM_PCI))
        node.set(Property.from_u32("memory-region", pool))
        node.set(Property.from_strings("memory-region-names", ["dma"]))
    else:
        side = 0 if role == "frontend" else 1
        db = m.doorbell + (2 * bus + side) * m.doorbell_size
        name = f"virtio-msg@{db:x}"
        spi = spis.take(f"/{name}")
        plan.spis[f"/{name}"] = spi
        node = _root_overlay(ov).add_child(Node(name))
        node.set(Property.from_string("compatible", MSG_COMPATIBLE))
        node.set(Property.from_cells("reg", [(db, m.doorbell_size)], ac, sc))
        node.set(Property.from_u32("interrupt-parent", _gic_ref(gic)))
        node.set(Property.from_u32("interrupts", 0, spi, IRQ_TYPE_EDGE_RISING))
        node.set(Property.from_u32("memory-region", pool, Ref(rings[vm].label)))
        node.set(Property.from_strings("memory-region-names", ["dma", "msg-ring"]))
    if role == "frontend":
        plan.msg_nodes[vm] = f"/{name}"
    node.set(Property.from_string("edgevirt,role", role))
    peers = [vm] if role == "backend" else [v.name for v in spec.services]
    if peers:
        node.set(Property.from_strings("edgevirt,peer", peers))
    node.set(Property.from_u32("edgevirt,device-count", len(devices)))
    node.set(Property.from_u32("edgevirt,device-ids", *[d.virtio_id for d in devices]))
    node.set(Property.from_u32("edgevirt,ring-slots", m.ring_slots))
    node.set(Property.from_u32("edgevirt,slot-size", m.slot_size))
    if role == "frontend":
        node.set(Property.empty("dma-coherent"))
