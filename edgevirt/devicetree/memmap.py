"""A board's physical memory map: RAM, what is already taken, and free ranges.

RAM is the board profile's ``[[ram]]`` when given (firmware often fills the DTB's memory
node at boot: upstream SA8155P and Raspberry Pi DTBs say size 0), else the DTB's memory
nodes. Taken: ``/memreserve/`` entries, ``/reserved-memory`` children with a ``reg`` (dynamic
ones with only ``size`` have no address yet and are listed without one), and the
bootloader's load windows. :func:`highest_free` is the "auto" placement: the highest
aligned range inside one RAM range that overlaps nothing taken.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgevirt.board import Board
from edgevirt.devicetree.compose import _reg, memory_ranges
from edgevirt.devicetree.fdt import Fdt
from edgevirt.errors import DeviceTreeError

__all__ = ["MemoryMap", "Region", "fmt_range", "highest_free", "memory_map"]


def fmt_range(base: int, size: int) -> str:
    return f"{base:#x}-{base + size - 1:#x} (size {size:#x})"


@dataclass(frozen=True)
class Region:
    kind: str  # ram, memreserve, reserved, load, carveout, msg-ring, doorbell
    base: int
    size: int
    name: str
    detail: str = ""

    @property
    def end(self) -> int:
        return self.base + self.size

    def overlaps(self, base: int, size: int) -> bool:
        return self.size > 0 and base < self.end and self.base < base + size

    def describe(self) -> str:
        return f"{self.name} {fmt_range(self.base, self.size)}"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "base": hex(self.base),
            "size": hex(self.size),
            "end": hex(self.end),
            "detail": self.detail,
        }


@dataclass
class MemoryMap:
    board: str
    ram: list[Region]
    taken: list[Region]  # reserved regions and load windows: carve-outs must avoid them
    dynamic: list[str] = field(default_factory=list)  # reserved nodes without an address
    added: list[Region] = field(default_factory=list)  # what a spec places (carve-outs…)

    @property
    def regions(self) -> list[Region]:
        return sorted(self.ram + self.taken + self.added, key=lambda r: (r.base, -r.size))

    def ram_containing(self, base: int, size: int) -> Region | None:
        for r in self.ram:
            if r.base <= base and base + size <= r.end:
                return r
        return None

    def conflicts(self, base: int, size: int) -> list[Region]:
        return sorted(
            (r for r in self.taken + self.added if r.overlaps(base, size)), key=lambda r: r.base
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "board": self.board,
            "regions": [r.to_json() for r in self.regions],
            "dynamic_reserved": self.dynamic,
        }


def memory_map(board: Board, fdt: Fdt) -> MemoryMap:
    if board.ram:
        ram = [Region("ram", r.base, r.size, "RAM", "board profile [[ram]]") for r in board.ram]
    else:
        ram = [
            Region("ram", a, s, "RAM", "DTB memory node") for a, s in memory_ranges(fdt) if s > 0
        ]
    if not ram:
        raise DeviceTreeError(
            f"{board.path}: the DTB's memory nodes give no RAM (size 0: firmware fills them "
            "in) and the board profile has no [[ram]]",
            hint="add [[ram]] tables (base, size) to the board profile",
        )
    taken = [Region("memreserve", a, s, "/memreserve/") for a, s in fdt.memreserve if s > 0]
    dynamic: list[str] = []
    rmem = fdt.root.child("reserved-memory")
    if rmem is not None:
        for child in rmem.children.values():
            path = f"/reserved-memory/{child.name}"
            regs = [(a, s) for a, s in _reg(fdt, path, child) if s > 0]
            compat = child.get("compatible")
            what = compat.value.split(b"\0")[0].decode("ascii", "replace") if compat else ""
            what += " no-map" if child.get("no-map") is not None else ""
            if not regs:
                dynamic.append(path)
            taken += [Region("reserved", a, s, path, what.strip()) for a, s in regs]
    if board.bootloader is not None:
        taken += [
            Region("load", ld.address, ld.size, ld.name, board.bootloader.kind)
            for ld in board.bootloader.loads
        ]
        loads = [r for r in taken if r.kind == "load"]
        for i, a in enumerate(loads):
            for b in loads[i + 1 :]:
                if a.overlaps(b.base, b.size):
                    raise DeviceTreeError(
                        f"{board.where('bootloader')}: {a.describe()} overlaps {b.describe()}",
                        hint="move one address or shrink its *_size",
                    )
    return MemoryMap(board.name, ram, taken, dynamic)


def highest_free(mm: MemoryMap, size: int, align: int) -> int | None:
    """Base of the highest ``align``-aligned ``size`` range inside one RAM range that
    overlaps nothing taken or added; None if there is none."""
    for ram in sorted(mm.ram, key=lambda r: r.end, reverse=True):
        top = ram.end
        while top - size >= ram.base:
            base = (top - size) & ~(align - 1)
            if base < ram.base:
                break
            hits = mm.conflicts(base, size)
            if not hits:
                return base
            top = min(r.base for r in hits)  # go below the lowest blocker and retry
    return None
