"""Structural checks on a base tree before anything is composed onto it.

The blob parser already refuses malformed blobs; these are rules of a *well-formed* tree
that composing relies on: phandles are unique (an overlay's references resolve through
them), ``reg`` lengths match the parent's ``#address-cells``/``#size-cells``, and an
existing ``/reserved-memory`` with empty ``ranges`` uses the root's cell sizes (empty
``ranges`` means identity mapping, which needs the same address width).
"""

from __future__ import annotations

from edgevirt.devicetree.fdt import Fdt
from edgevirt.errors import DeviceTreeError

__all__ = ["check_base"]


def check_base(fdt: Fdt) -> None:
    seen: dict[int, str] = {}
    for path, node in fdt.walk():
        for key in ("phandle", "linux,phandle"):
            prop = node.get(key)
            if prop is not None and len(prop.value) != 4:
                raise DeviceTreeError(f"{path}: {key} is {len(prop.value)} bytes, expected 4")
        ph = node.phandle
        if ph is None:
            continue
        if ph in (0, 0xFFFFFFFF):
            raise DeviceTreeError(f"{path}: phandle {ph:#x} is not a valid phandle")
        if ph in seen:
            raise DeviceTreeError(f"phandle collision: {ph:#x} is on both {seen[ph]} and {path}")
        seen[ph] = path
    for path, node in fdt.walk():
        reg = node.get("reg")
        if reg is None or path == "/":
            continue
        parent = path.rsplit("/", 1)[0] or "/"
        ac, sc = fdt.cells(parent)
        width = 4 * (ac + sc)
        if width and len(reg.value) % width:
            raise DeviceTreeError(
                f"{path}: reg is {len(reg.value)} bytes, not a multiple of {width} "
                f"(#address-cells = {ac}, #size-cells = {sc} in {parent}): cells mismatch"
            )
    rmem = fdt.root.child("reserved-memory")
    if rmem is not None:
        ranges = rmem.get("ranges")
        if (
            ranges is not None
            and not ranges.value
            and fdt.cells("/reserved-memory") != fdt.cells("/")
        ):
            raise DeviceTreeError(
                "/reserved-memory: #address-cells/#size-cells "
                f"{fdt.cells('/reserved-memory')} differ from the root's {fdt.cells('/')} "
                "with an empty ranges (identity mapping): cells mismatch"
            )
