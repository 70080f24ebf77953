"""DTS text for edgevirt's tree model: what ``Fdt.to_dts`` and ``dt diff`` print.

Mirrors dtc's own choices so the output reads like ``dtc -O dts``: printable
NUL-terminated byte strings as strings, values that are whole 32-bit cells as ``<…>`` in hex
(always so for properties known to hold cells), anything else as ``[bytes]``; label
references as ``&label``.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from edgevirt.errors import DeviceTreeError

if TYPE_CHECKING:
    from edgevirt.devicetree.fdt import Node, Property

__all__ = ["dts_node", "format_value"]

_U32 = struct.Struct(">I")

#: Properties printed as cells in DTS even when their bytes happen to look like text.
_CELL_PROPS = frozenset(
    {
        "reg",
        "ranges",
        "dma-ranges",
        "phandle",
        "linux,phandle",
        "interrupts",
        "interrupt-parent",
        "interrupts-extended",
        "interrupt-map",
        "interrupt-map-mask",
        "memory-region",
        "clocks",
        "msi-parent",
        "iommus",
        "target",
        "size",
        "alignment",
    }
)


def _is_printable_strings(value: bytes) -> bool:
    """dtc's ``util_is_printable_string``: non-empty printable strings, NUL-terminated."""
    if not value or value[-1] != 0:
        return False
    return all(part and all(0x20 <= b < 0x7F for b in part) for part in value[:-1].split(b"\0"))


def format_value(prop: Property) -> str:
    """The DTS right-hand side of ``prop`` (empty string for an empty property)."""
    value = prop.value
    if prop.refs:
        if len(value) % 4 or any(off % 4 or off + 4 > len(value) for off, _ in prop.refs):
            raise DeviceTreeError(f"property {prop.name!r}: references must sit on whole cells")
        refs = dict(prop.refs)
        cells = [
            f"&{refs[i]}" if i in refs else f"{_U32.unpack_from(value, i)[0]:#x}"
            for i in range(0, len(value), 4)
        ]
        return "<" + " ".join(cells) + ">"
    if not value:
        return ""
    as_cells = len(value) % 4 == 0 and (prop.name in _CELL_PROPS or prop.name.endswith("-cells"))
    if not as_cells and _is_printable_strings(value):
        parts = value[:-1].decode("ascii").split("\0")
        return ", ".join('"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"' for p in parts)
    if len(value) % 4 == 0:
        return "<" + " ".join(f"{c:#x}" for (c,) in _U32.iter_unpack(value)) + ">"
    return "[" + " ".join(f"{b:02x}" for b in value) + "]"


def dts_node(node: Node, depth: int, lines: list[str]) -> None:
    indent = "\t" * depth
    labels = "".join(f"{label}: " for label in node.labels)
    lines.append(f"{indent}{labels}{node.name or '/'} {{")
    for prop in node.properties.values():
        rhs = format_value(prop)
        lines.append(f"{indent}\t{prop.name}" + (f" = {rhs};" if rhs else ";"))
    for child in node.children.values():
        lines.append("")
        dts_node(child, depth + 1, lines)
    lines.append(f"{indent}}};")
