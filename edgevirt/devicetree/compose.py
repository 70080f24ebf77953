"""Compose the carve-out overlay: a ``restricted-dma-pool`` and the virtio devices using it.

The overlay (see DESIGN §1, §3) has one fragment targeting ``/`` that adds
``/reserved-memory`` (``#address-cells``/``#size-cells`` copied from the root, empty
``ranges``) holding ``restricted-dma@<addr>`` (compatible ``restricted-dma-pool``, ``reg``,
a phandle, label ``edgevirt_carveout``), and one fragment per virtio-mmio node adding
``memory-region = <&edgevirt_carveout>``. If the base already has ``/reserved-memory``, the
first fragment targets it instead, so its own cells and ranges stay as they are.

Addresses are those of the node's parent bus (``reg`` read with the parent's cells); bus
``ranges`` are not translated. On QEMU ``virt`` every node involved sits at the root.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edgevirt.devicetree.fdt import Fdt, Node, Property, Ref, check_label
from edgevirt.devicetree.overlay import Overlay, apply_overlay
from edgevirt.errors import DeviceTreeError

__all__ = [
    "PAGE_SIZE",
    "VirtioMmio",
    "compose_carveout",
    "memory_ranges",
    "reserved_ranges",
    "virtio_mmio_nodes",
    "write_outputs",
]

PAGE_SIZE = 0x1000
RESTRICTED_DMA_POOL = "restricted-dma-pool"


@dataclass(frozen=True)
class VirtioMmio:
    """A ``virtio,mmio`` node: where it is, its register window and its interrupt cells."""

    path: str
    address: int
    size: int
    interrupts: tuple[int, ...]


def _range(base: int, size: int) -> str:
    return f"{base:#x}-{base + size - 1:#x} (size {size:#x})"


def _compatible(node: Node) -> list[str]:
    prop = node.get("compatible")
    if prop is None:
        return []
    try:
        return prop.as_strings()
    except DeviceTreeError:
        return []


def _reg(fdt: Fdt, path: str, node: Node) -> list[tuple[int, int]]:
    prop = node.get("reg")
    if prop is None:
        return []
    parent = path.rsplit("/", 1)[0] or "/"
    ac, sc = fdt.cells(parent)
    try:
        return prop.as_cells(ac, sc)
    except DeviceTreeError as exc:
        raise DeviceTreeError(f"{path}: {exc}") from None


def virtio_mmio_nodes(base: Fdt) -> list[VirtioMmio]:
    """Every ``virtio,mmio`` node in tree order, with its first ``reg`` window."""
    out = []
    for path, node in base.walk():
        if "virtio,mmio" not in _compatible(node):
            continue
        reg = _reg(base, path, node)
        addr, size = reg[0] if reg else (0, 0)
        irq = node.get("interrupts")
        out.append(VirtioMmio(path, addr, size, tuple(irq.as_u32_list()) if irq else ()))
    return out


def memory_ranges(base: Fdt) -> list[tuple[int, int]]:
    """(base, size) of every ``reg`` entry of every ``device_type = "memory"`` node."""
    out: list[tuple[int, int]] = []
    for path, node in _memory_nodes(base):
        out += _reg(base, path, node)
    return out


def _memory_nodes(base: Fdt) -> list[tuple[str, Node]]:
    found = []
    for node in base.root.children.values():
        dtype = node.get("device_type")
        if dtype is not None and dtype.value == b"memory\0":
            found.append(("/" + node.name, node))
    return found


def reserved_ranges(base: Fdt) -> list[tuple[int, int, str]]:
    """(base, size, origin) of ``/memreserve/`` entries and ``/reserved-memory`` children."""
    out = [(a, s, "/memreserve/") for a, s in base.memreserve]
    rmem = base.root.child("reserved-memory")
    if rmem is not None:
        for child in rmem.children.values():
            path = f"/reserved-memory/{child.name}"
            out += [(a, s, path) for a, s in _reg(base, path, child)]
    return out


def compose_carveout(
    base: Fdt,
    carveout_base: int,
    carveout_size: int,
    virtio_paths: list[str],
    *,
    name: str = "edgevirt_carveout",
) -> Overlay:
    """The carve-out overlay for ``base``; every input is checked first (see module doc)."""
    check_label(name)
    what = f"carve-out {_range(carveout_base, max(carveout_size, 1))}"
    if carveout_size <= 0 or carveout_base < 0:
        raise DeviceTreeError(
            f"carve-out at {carveout_base:#x}: size {carveout_size:#x} must be positive"
        )
    if carveout_base % PAGE_SIZE or carveout_size % PAGE_SIZE:
        raise DeviceTreeError(f"{what}: base and size must be {PAGE_SIZE:#x}-aligned (4 KiB)")
    end = carveout_base + carveout_size
    mem = [(p, a, s) for p, n in _memory_nodes(base) for a, s in _reg(base, p, n)]
    if not any(a <= carveout_base and end <= a + s for _, a, s in mem):
        have = "; ".join(f"{_range(a, s)} in {p}" for p, a, s in mem) or "no memory nodes"
        raise DeviceTreeError(
            f"{what} does not lie inside one memory range; memory: {have}",
            hint="a carve-out may not span two memory@ nodes or reg entries",
        )
    for a, s, origin in reserved_ranges(base):
        if a < end and carveout_base < a + s:
            raise DeviceTreeError(f"{what} overlaps reserved region {_range(a, s)} ({origin})")

    targets = []
    for path in virtio_paths:
        node = base.find(path)
        if node is None:
            known = ", ".join(v.path for v in virtio_mmio_nodes(base)[-3:])
            raise DeviceTreeError(
                f"virtio node {path!r} is not in the base tree",
                hint=f"virtio-mmio nodes include {known}" if known else None,
            )
        canonical = base.path_of(node)
        if "virtio,mmio" not in _compatible(node):
            raise DeviceTreeError(
                f"{canonical}: compatible {_compatible(node)!r} does not include 'virtio,mmio'"
            )
        if node.get("memory-region") is not None:
            raise DeviceTreeError(f"{canonical}: already has a memory-region")
        if canonical in targets:
            raise DeviceTreeError(f"{canonical}: listed twice")
        targets.append(canonical)

    symbols = base.root.child("__symbols__")
    if symbols is not None and symbols.get(name) is not None:
        raise DeviceTreeError(f"label {name!r} is already in the base's __symbols__")

    ac, sc = base.cells("/")
    pool = Node(f"restricted-dma@{carveout_base:x}", labels=[name])
    pool.set(Property.from_string("compatible", RESTRICTED_DMA_POOL))
    overlay = Overlay(
        description=f"edgevirt carve-out {_range(carveout_base, carveout_size)} for "
        + (", ".join(targets) or "no devices")
    )
    rmem = base.root.child("reserved-memory")
    if rmem is None:
        holder = overlay.add_fragment("/").add_child(Node("reserved-memory"))
        holder.set(Property.from_u32("#address-cells", ac))
        holder.set(Property.from_u32("#size-cells", sc))
        holder.set(Property.empty("ranges"))
    else:
        if rmem.child(pool.name) is not None:
            raise DeviceTreeError(f"/reserved-memory/{pool.name} already exists")
        ac, sc = base.cells("/reserved-memory")
        holder = overlay.add_fragment("/reserved-memory")
    pool.set(Property.from_cells("reg", [(carveout_base, carveout_size)], ac, sc))
    holder.add_child(pool)
    for path in targets:
        overlay.add_fragment(path).set(Property.from_u32("memory-region", Ref(name)))
    return overlay


def write_outputs(
    base: Fdt, overlay: Overlay, outdir: str | os.PathLike[str], stem: str
) -> dict[str, Path]:
    """Write ``stem.dtbo`` (compiled overlay), ``stem.dts`` (its ``/plugin/`` source) and
    ``stem.dtb`` (``base`` with the overlay applied, compact: totalsize == file size)."""
    if not stem or "/" in stem or stem.startswith("."):
        raise DeviceTreeError(f"invalid output stem {stem!r}")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    compiled = overlay.to_fdt()
    applied = apply_overlay(base, compiled)
    paths = {kind: out / f"{stem}.{kind}" for kind in ("dtbo", "dts", "dtb")}
    paths["dtbo"].write_bytes(compiled.to_bytes())
    paths["dts"].write_text(overlay.to_dts())
    paths["dtb"].write_bytes(applied.to_bytes())
    return paths
