"""Device trees: FDT model, overlays, the carve-out and system composers, memory maps, diffs.

QEMU ``virt``'s DTB has no labels and no ``__symbols__``, so overlays target its nodes by
path (``target-path``); every DTB edgevirt writes is compact (totalsize == data), because
QEMU hangs on the 1 MiB-padded ``dumpdtb`` output.
"""

from edgevirt.devicetree.basedtb import BaseDtb, base_dtb
from edgevirt.devicetree.compose import (
    VirtioMmio,
    compose_carveout,
    memory_ranges,
    reserved_ranges,
    virtio_mmio_nodes,
    write_outputs,
)
from edgevirt.devicetree.diff import diff_trees
from edgevirt.devicetree.fdt import Fdt, Node, Property, Ref
from edgevirt.devicetree.memmap import MemoryMap, memory_map
from edgevirt.devicetree.overlay import Overlay, apply_overlay, compile_overlay
from edgevirt.devicetree.system import SystemPlan, compose_system

__all__ = [
    "BaseDtb",
    "MemoryMap",
    "SystemPlan",
    "base_dtb",
    "compose_system",
    "diff_trees",
    "memory_map",
    "Fdt",
    "Node",
    "Overlay",
    "Property",
    "Ref",
    "VirtioMmio",
    "apply_overlay",
    "compile_overlay",
    "compose_carveout",
    "memory_ranges",
    "reserved_ranges",
    "virtio_mmio_nodes",
    "write_outputs",
]
