"""Device trees: edgevirt's FDT model, overlays (build, compile, apply), carve-out composer.

QEMU ``virt``'s DTB has no labels and no ``__symbols__``, so overlays target its nodes by
path (``target-path``); every DTB edgevirt writes is compact (totalsize == data), because
QEMU hangs on the 1 MiB-padded ``dumpdtb`` output.
"""

from edgevirt.devicetree.compose import (
    VirtioMmio,
    compose_carveout,
    memory_ranges,
    reserved_ranges,
    virtio_mmio_nodes,
    write_outputs,
)
from edgevirt.devicetree.fdt import Fdt, Node, Property, Ref
from edgevirt.devicetree.overlay import Overlay, apply_overlay, compile_overlay

__all__ = [
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
