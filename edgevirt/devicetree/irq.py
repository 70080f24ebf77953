"""Interrupts in a tree: which GIC SPIs are taken, by whom; the interrupt controller.

Nodes edgevirt adds (virtio-mmio on real boards, virtio-msg doorbells) need an SPI no other
node uses. A node's interrupt parent is its own or its nearest ancestor's
``interrupt-parent`` (DT spec §2.4); ``interrupts`` is read with that parent's
``#interrupt-cells``; ``interrupts-extended`` and ``interrupt-map`` name the parent per entry.
For an ARM GIC (3 cells, first cell 0 = SPI) the second cell is the SPI number.
Disabled nodes count as users: a bootloader may enable them. GICv2m MSI frames count through
``arm,msi-base-spi``/``arm,msi-num-spis``; QEMU's frame omits them (its SPIs 80-143 come
from a register), which is why boards name their free ``spi_range`` explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgevirt.devicetree.fdt import Fdt, Node
from edgevirt.errors import DeviceTreeError

__all__ = ["GIC_SPI", "InterruptController", "find_interrupt_controller", "used_spis"]

GIC_SPI = 0
GIC_COMPATIBLE_PREFIXES = ("arm,gic", "arm,cortex-a15-gic", "arm,cortex-a9-gic", "qcom,msm-qgic2")
IRQ_TYPE_EDGE_RISING = 1


@dataclass(frozen=True)
class InterruptController:
    path: str
    phandle: int
    interrupt_cells: int
    address_cells: int
    compatible: tuple[str, ...]
    label: str | None  # a __symbols__ label for it, if the base has one

    @property
    def is_gic(self) -> bool:
        return any(c.startswith(GIC_COMPATIBLE_PREFIXES) for c in self.compatible)


def _u32(node: Node, name: str, default: int) -> int:
    prop = node.get(name)
    return prop.as_u32() if prop is not None and len(prop.value) == 4 else default


def _controller(fdt: Fdt, path: str, node: Node) -> InterruptController:
    if node.get("interrupt-controller") is None:
        raise DeviceTreeError(f"{path}: is not an interrupt controller (no interrupt-controller)")
    if node.phandle is None:
        raise DeviceTreeError(f"{path}: interrupt controller has no phandle")
    compat = node.get("compatible")
    label = None
    symbols = fdt.root.child("__symbols__")
    if symbols is not None:
        for name, prop in symbols.properties.items():
            if prop.value == path.encode() + b"\0":
                label = name
                break
    return InterruptController(
        path=path,
        phandle=node.phandle,
        interrupt_cells=_u32(node, "#interrupt-cells", 0),
        address_cells=_u32(node, "#address-cells", 0),
        compatible=tuple(compat.as_strings()) if compat and compat.value.endswith(b"\0") else (),
        label=label,
    )


def find_interrupt_controller(fdt: Fdt, path: str | None = None) -> InterruptController:
    """The controller at ``path``, or the one the root's ``interrupt-parent`` names."""
    if path is not None:
        node = fdt.find(path)
        if node is None:
            raise DeviceTreeError(f"interrupt controller {path!r} is not in the tree")
        return _controller(fdt, fdt.path_of(node), node)
    prop = fdt.root.get("interrupt-parent")
    if prop is None:  # e.g. R-Car: only /soc names it; take the tree's one GIC
        gics = [
            (p, n)
            for p, n in fdt.walk()
            if n.get("interrupt-controller") is not None
            and _controller(fdt, p, n).is_gic
            and n.phandle is not None
        ]
        if len(gics) != 1:
            raise DeviceTreeError(
                f"the root has no interrupt-parent and the tree has {len(gics)} GIC nodes; "
                "name the interrupt controller ([dt] interrupt_controller)"
            )
        return _controller(fdt, *gics[0])
    node = fdt.by_phandle(prop.as_u32())
    if node is None:
        raise DeviceTreeError(f"/: interrupt-parent {prop.as_u32():#x} names no node")
    return _controller(fdt, fdt.path_of(node), node)


def used_spis(fdt: Fdt, gic: InterruptController) -> dict[int, list[str]]:
    """SPI number → paths of the nodes that use it with ``gic`` as their parent."""
    by_phandle = {n.phandle: (p, n) for p, n in fdt.walk() if n.phandle is not None}
    out: dict[int, list[str]] = {}

    def note(spec: list[int], path: str) -> None:
        if len(spec) >= 2 and spec[0] == GIC_SPI:
            users = out.setdefault(spec[1], [])
            if path not in users:
                users.append(path)

    def cells_of(phandle: int) -> tuple[int, int] | None:
        hit = by_phandle.get(phandle)
        if hit is None:
            return None
        return _u32(hit[1], "#interrupt-cells", 0), _u32(hit[1], "#address-cells", 0)

    def visit(path: str, node: Node, parent_ph: int | None) -> None:
        prop = node.get("interrupt-parent")
        if prop is not None and len(prop.value) == 4:
            parent_ph = prop.as_u32()
        ints = node.get("interrupts")
        if ints is not None and parent_ph == gic.phandle and len(ints.value) % 4 == 0:
            cells = ints.as_u32_list()
            n = gic.interrupt_cells or 3
            for i in range(0, len(cells) - n + 1, n):
                note(cells[i : i + n], path)
        ext = node.get("interrupts-extended")
        if ext is not None and len(ext.value) % 4 == 0:
            cells = ext.as_u32_list()
            i = 0
            while i < len(cells):
                info = cells_of(cells[i])
                if info is None:
                    break
                if cells[i] == gic.phandle:
                    note(cells[i + 1 : i + 1 + info[0]], path)
                i += 1 + info[0]
        base, num = node.get("arm,msi-base-spi"), node.get("arm,msi-num-spis")
        if base is not None and num is not None and len(base.value) == len(num.value) == 4:
            for intid in range(base.as_u32(), base.as_u32() + num.as_u32()):
                note([GIC_SPI, intid - 32], path)  # GICv2m frames give INTIDs; SPI = INTID-32
        imap = node.get("interrupt-map")
        if imap is not None and len(imap.value) % 4 == 0:
            _interrupt_map(node, imap.as_u32_list(), cells_of, gic, lambda s: note(s, path))
        for child in node.children.values():
            visit(path.rstrip("/") + "/" + child.name, child, parent_ph)

    root_parent = fdt.root.get("interrupt-parent")
    ok = root_parent is not None and len(root_parent.value) == 4
    visit("/", fdt.root, root_parent.as_u32() if root_parent is not None and ok else None)
    return out


def _interrupt_map(node, cells, cells_of, gic, note) -> None:  # type: ignore[no-untyped-def]
    """Walk ``interrupt-map`` entries: child unit address + child spec, parent phandle,
    parent unit address + parent spec (widths from the parent's cells)."""
    child = _u32(node, "#address-cells", 0) + _u32(node, "#interrupt-cells", 0)
    i = 0
    while i + child < len(cells):
        ph = cells[i + child]
        info = cells_of(ph)
        if info is None:
            return  # unknown parent: widths unknowable, stop rather than misread
        start = i + child + 1 + info[1]
        spec = cells[start : start + info[0]]
        if ph == gic.phandle:
            note(spec)
        i = start + info[0]
