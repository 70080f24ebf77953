"""What changed between two trees, node by node (``edgevirt dt diff BASE FINAL``).

Nodes are matched by full path; properties by name; values are shown as DTS would print
them (:func:`~edgevirt.devicetree.fdt.format_value`), so a diff reads like the source.
Order-only changes (libfdt inserts overlay properties first) are not differences.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgevirt.devicetree.fdt import Fdt, Node, format_value

__all__ = ["NodeChange", "diff_trees"]


@dataclass
class NodeChange:
    path: str
    change: str  # added | removed | modified
    added: dict[str, str] = field(default_factory=dict)  # property -> new value
    removed: dict[str, str] = field(default_factory=dict)  # property -> old value
    changed: dict[str, tuple[str, str]] = field(default_factory=dict)  # (old, new)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "change": self.change,
            "added": self.added,
            "removed": self.removed,
            "changed": {k: {"old": o, "new": n} for k, (o, n) in self.changed.items()},
        }


def _show(node: Node, name: str) -> str:
    return format_value(node.properties[name]) or "(empty)"


def diff_trees(base: Fdt, final: Fdt) -> list[NodeChange]:
    """Changes in tree order of ``final`` (removed nodes at their place in ``base``)."""
    old = dict(base.walk())
    new = dict(final.walk())
    out: list[NodeChange] = []
    for path, node in final.walk():
        if path not in old:
            out.append(
                NodeChange(path, "added", added={n: _show(node, n) for n in node.properties})
            )
            continue
        before = old[path]
        ch = NodeChange(path, "modified")
        for name in node.properties:
            if name not in before.properties:
                ch.added[name] = _show(node, name)
            elif before.properties[name].value != node.properties[name].value:
                ch.changed[name] = (_show(before, name), _show(node, name))
        for name in before.properties:
            if name not in node.properties:
                ch.removed[name] = _show(before, name)
        if ch.added or ch.removed or ch.changed:
            out.append(ch)
    for path, node in base.walk():
        if path not in new:
            out.append(
                NodeChange(path, "removed", removed={n: _show(node, n) for n in node.properties})
            )
    if base.memreserve != final.memreserve:
        fmt = ", ".join
        out.append(
            NodeChange(
                "/memreserve/",
                "modified",
                changed={
                    "entries": (
                        fmt(f"{a:#x}+{s:#x}" for a, s in base.memreserve) or "(none)",
                        fmt(f"{a:#x}+{s:#x}" for a, s in final.memreserve) or "(none)",
                    )
                },
            )
        )
    return out
