"""edgevirt's own flattened-device-tree model: parse, edit, serialize, print as DTS.

The model is deliberately small: a :class:`Node` has a name, ordered properties and ordered
children (plus, for trees written as source, labels); a :class:`Property` is a name and its
raw bytes, with typed helpers (u32/u64 cells, strings, ``reg``-style cells); an :class:`Fdt`
is the root node, ``boot_cpuid_phys`` and the ``/memreserve/`` entries.

Why pyfdt (a declared dependency) is not used for parsing or writing blobs:

* Its blob parser does unchecked reads. A truncated blob raises ``TypeError``/``struct.error``
  (not an error the caller can catch meaningfully), an unknown token is taken for
  ``FDT_BEGIN_NODE`` (``'' in 'node_begin'`` is true), and ``totalsize``, ``size_dt_struct``,
  ``size_dt_strings`` and string-offset bounds are never checked. edgevirt must turn every
  malformed blob into a :class:`~edgevirt.errors.DeviceTreeError` naming the offset.
* It guesses each property's type from its bytes (strings, 32-bit words, signed bytes) and
  on Python 3 cannot give the raw value back (``to_raw()`` joins ``bytes`` into ``str``).
  Our layer owns the typing: values stay raw bytes; the caller says how to read them.
* It knows only 32-bit cells, no labels, no phandle references and no overlays.

So the blob format is handled here: the header layout is declared once
(``_HEADER_FIELDS``), every read is bounds-checked before it happens (``_Reader`` for the
structure and strings blocks), and every failure is a DeviceTreeError that names the blob
offset and what was expected there. pyfdt is kept as an independent second reader in the
tests: for well-formed QEMU blobs both must see the same tree.

Paths are resolved the way libfdt's ``fdt_path_offset`` does (``find``): a component
without ``@`` also matches ``name@unit``, the first match wins, and a path not starting
with ``/`` starts with an alias from ``/aliases``.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from edgevirt.devicetree.dts import dts_node, format_value
from edgevirt.errors import DeviceTreeError

__all__ = ["Fdt", "Node", "Property", "Ref", "check_label", "check_name", "format_value"]

FDT_MAGIC = 0xD00DFEED
FDT_BEGIN_NODE = 0x1
FDT_END_NODE = 0x2
FDT_PROP = 0x3
FDT_NOP = 0x4
FDT_END = 0x9
_TOKEN_NAMES = {1: "FDT_BEGIN_NODE", 2: "FDT_END_NODE", 3: "FDT_PROP", 4: "FDT_NOP", 9: "FDT_END"}

#: Version-17 header, in blob order (all big-endian u32).
_HEADER_FIELDS = (
    "magic",
    "totalsize",
    "off_dt_struct",
    "off_dt_strings",
    "off_mem_rsvmap",
    "version",
    "last_comp_version",
    "boot_cpuid_phys",
    "size_dt_strings",
    "size_dt_struct",
)
_HEADER = struct.Struct(">10I")
_RSV_ENTRY = struct.Struct(">QQ")
_U32 = struct.Struct(">I")
MAX_DEPTH = 64  # deeper trees are refused (real ones are < 10 deep); keeps recursion safe
PHANDLE_MAX = 0xFFFFFFFE  # 0 and 0xffffffff are not valid phandles

#: Characters dtc accepts in node and property names (its lexer's PROPNODECHAR).
_NAME_RE = re.compile(r"[a-zA-Z0-9,._+*#?@-]+\Z")
_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


def _align4(n: int) -> int:
    return (n + 3) & ~3


def check_name(name: str, what: str = "name") -> None:
    """Refuse names dtc could not print back (empty, or characters outside its lexer)."""
    if not _NAME_RE.match(name):
        raise DeviceTreeError(f"invalid {what} {name!r}: must match [a-zA-Z0-9,._+*#?@-]+")


def check_label(label: str) -> None:
    if not _LABEL_RE.match(label):
        raise DeviceTreeError(f"invalid label {label!r}: must match [a-zA-Z_][a-zA-Z0-9_]*")


@dataclass(frozen=True)
class Ref:
    """A phandle reference to a label (``<&label>``), resolved when an overlay is compiled."""

    label: str


@dataclass(frozen=True)
class Property:
    """A property: name and raw value. ``refs`` lists ``(byte offset, label)`` of cells that
    are label references (their bytes hold a placeholder until compiled)."""

    name: str
    value: bytes = b""
    refs: tuple[tuple[int, str], ...] = ()

    def __post_init__(self) -> None:
        check_name(self.name, "property name")

    # -- constructors ------------------------------------------------------------------
    @classmethod
    def empty(cls, name: str) -> Property:
        return cls(name)

    @classmethod
    def from_u32(cls, name: str, *cells: int | Ref) -> Property:
        out, refs = bytearray(), []
        for cell in cells:
            if isinstance(cell, Ref):
                check_label(cell.label)
                refs.append((len(out), cell.label))
                cell = 0xFFFFFFFF
            if not 0 <= cell <= 0xFFFFFFFF:
                raise DeviceTreeError(f"{name}: value {cell:#x} does not fit in a 32-bit cell")
            out += _U32.pack(cell)
        return cls(name, bytes(out), tuple(refs))

    @classmethod
    def from_u64(cls, name: str, *values: int) -> Property:
        return cls(name, _pack_cells(name, [(v, 2) for v in values]))

    @classmethod
    def from_string(cls, name: str, text: str) -> Property:
        return cls.from_strings(name, [text])

    @classmethod
    def from_strings(cls, name: str, texts: Iterable[str]) -> Property:
        out = bytearray()
        for text in texts:
            raw = text.encode("utf-8")
            if b"\0" in raw:
                raise DeviceTreeError(f"{name}: string {text!r} contains NUL")
            out += raw + b"\0"
        return cls(name, bytes(out))

    @classmethod
    def from_cells(
        cls, name: str, entries: Iterable[tuple[int, int]], address_cells: int, size_cells: int
    ) -> Property:
        """``reg``-style value: (address, size) pairs with the given cell counts."""
        items: list[tuple[int, int]] = []
        for addr, size in entries:
            items += [(addr, address_cells), (size, size_cells)]
        return cls(name, _pack_cells(name, items))

    # -- typed readers -----------------------------------------------------------------
    def _fail(self, expected: str) -> DeviceTreeError:
        return DeviceTreeError(
            f"property {self.name!r}: expected {expected}, value is {len(self.value)} bytes "
            f"({self.value[:16].hex()}{'...' if len(self.value) > 16 else ''})"
        )

    def as_u32_list(self) -> list[int]:
        if len(self.value) % 4:
            raise self._fail("a multiple of 4 bytes (u32 cells)")
        return [v for (v,) in _U32.iter_unpack(self.value)]

    def as_u32(self) -> int:
        if len(self.value) != 4:
            raise self._fail("one u32 cell")
        return int(_U32.unpack(self.value)[0])

    def as_u64_list(self) -> list[int]:
        if len(self.value) % 8:
            raise self._fail("a multiple of 8 bytes (u64 values)")
        return [v for (v,) in struct.iter_unpack(">Q", self.value)]

    def as_u64(self) -> int:
        if len(self.value) != 8:
            raise self._fail("one u64 value")
        return int(struct.unpack(">Q", self.value)[0])

    def as_strings(self) -> list[str]:
        if not self.value.endswith(b"\0"):
            raise self._fail("NUL-terminated string(s)")
        try:
            return self.value[:-1].decode("utf-8").split("\0")
        except UnicodeDecodeError as exc:
            raise self._fail("UTF-8 string(s)") from exc

    def as_string(self) -> str:
        texts = self.as_strings()
        if len(texts) != 1:
            raise self._fail("exactly one string")
        return texts[0]

    def as_cells(self, address_cells: int, size_cells: int) -> list[tuple[int, int]]:
        """(address, size) pairs of a ``reg``-style value."""
        width = 4 * (address_cells + size_cells)
        if width == 0 or len(self.value) % width:
            raise self._fail(
                f"a multiple of {width} bytes (#address-cells={address_cells}, "
                f"#size-cells={size_cells})"
            )
        cells = self.as_u32_list()
        out = []
        for i in range(0, len(cells), address_cells + size_cells):
            out.append(
                (
                    _join(cells[i : i + address_cells]),
                    _join(cells[i + address_cells : i + address_cells + size_cells]),
                )
            )
        return out


def _join(cells: list[int]) -> int:
    value = 0
    for c in cells:
        value = (value << 32) | c
    return value


def _pack_cells(name: str, items: list[tuple[int, int]]) -> bytes:
    out = bytearray()
    for value, ncells in items:
        if not 0 <= value < 1 << (32 * ncells):
            raise DeviceTreeError(f"{name}: value {value:#x} does not fit in {ncells} cell(s)")
        out += value.to_bytes(4 * ncells, "big")
    return bytes(out)


@dataclass(eq=False)
class Node:
    """A node: name, ordered properties, ordered children, and (source trees only) labels."""

    name: str
    properties: dict[str, Property] = field(default_factory=dict)
    children: dict[str, Node] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.name:  # "" is the root
            check_name(self.name, "node name")

    @property
    def basename(self) -> str:
        return self.name.partition("@")[0]

    @property
    def unit_address(self) -> str | None:
        base, at, unit = self.name.partition("@")
        return unit if at else None

    @property
    def phandle(self) -> int | None:
        """The node's phandle as libfdt reads it (``phandle``, else ``linux,phandle``)."""
        for key in ("phandle", "linux,phandle"):
            prop = self.properties.get(key)
            if prop is not None and len(prop.value) == 4:
                return int(_U32.unpack(prop.value)[0])
        return None

    def get(self, name: str) -> Property | None:
        return self.properties.get(name)

    def prop(self, name: str) -> Property:
        prop = self.properties.get(name)
        if prop is None:
            raise DeviceTreeError(f"node {self.name or '/'!r} has no property {name!r}")
        return prop

    def set(self, prop: Property, *, front: bool = False) -> None:
        """Add or replace a property; a new one goes last, or first with ``front``
        (libfdt's ``fdt_setprop`` inserts new properties first)."""
        check_name(prop.name, "property name")
        if front and prop.name not in self.properties:
            self.properties = {prop.name: prop, **self.properties}
        else:
            self.properties[prop.name] = prop

    def remove(self, name: str) -> Property:
        try:
            return self.properties.pop(name)
        except KeyError:
            raise DeviceTreeError(f"node {self.name!r} has no property {name!r}") from None

    def add_child(self, child: Node, *, front: bool = False) -> Node:
        check_name(child.name, "node name")
        if child.name in self.children:
            raise DeviceTreeError(f"node {self.name or '/'!r} already has a child {child.name!r}")
        if front:
            self.children = {child.name: child, **self.children}
        else:
            self.children[child.name] = child
        return child

    def child(self, name: str) -> Node | None:
        """Exact-name child lookup."""
        return self.children.get(name)

    def find_child(self, name: str) -> Node | None:
        """libfdt's ``fdt_subnode_offset``: exact name, or ``name@…`` if ``name`` has no @."""
        for child in self.children.values():
            if child.name == name or (
                "@" not in name and child.basename == name and "@" in child.name
            ):
                return child
        return None

    def walk(self, path: str = "/") -> Iterator[tuple[str, Node]]:
        """Pre-order (path, node) pairs, this node first."""
        yield path, self
        for child in self.children.values():
            yield from child.walk(path.rstrip("/") + "/" + child.name)

    def copy(self) -> Node:
        return Node(
            self.name,
            dict(self.properties),
            {k: c.copy() for k, c in self.children.items()},
            list(self.labels),
        )

    def same_as(self, other: Node) -> bool:
        """Same names, properties and children, in the same order (labels ignored)."""
        return (
            self.name == other.name
            and list(self.properties.items()) == list(other.properties.items())
            and list(self.children) == list(other.children)
            and all(c.same_as(other.children[k]) for k, c in self.children.items())
        )


class _Reader:
    """Bounds-checked reads from a blob: the one place parse errors are produced."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def u32(self, off: int, limit: int, what: str) -> int:
        if off < 0 or off + 4 > limit:
            raise DeviceTreeError(
                f"DTB offset {off:#x}: expected {what} (4 bytes), but the block ends at {limit:#x}"
            )
        return int(_U32.unpack_from(self.data, off)[0])

    def cstring(self, off: int, limit: int, what: str) -> tuple[str, int]:
        """NUL-terminated ASCII string at ``off`` ending before ``limit``; (text, end)."""
        end = self.data.find(b"\0", off, limit)
        if end < 0:
            raise DeviceTreeError(
                f"DTB offset {off:#x}: expected a NUL-terminated {what} "
                f"before offset {limit:#x}, found none (unterminated string)"
            )
        raw = self.data[off:end]
        try:
            return raw.decode("ascii"), end
        except UnicodeDecodeError:
            raise DeviceTreeError(
                f"DTB offset {off:#x}: expected an ASCII {what}, found {raw[:32]!r}"
            ) from None


@dataclass(eq=False)
class Fdt:
    """A whole device tree: root node, boot CPU and ``/memreserve/`` entries."""

    root: Node = field(default_factory=lambda: Node(""))
    boot_cpuid_phys: int = 0
    memreserve: list[tuple[int, int]] = field(default_factory=list)

    # -- blob in -----------------------------------------------------------------------
    @classmethod
    def from_bytes(cls, data: bytes) -> Fdt:
        """Parse a DTB (version 16 or 17; anything after ``totalsize`` is ignored)."""
        data = bytes(data)
        rd = _Reader(data)
        if len(data) < 4 or rd.u32(0, len(data), "magic") != FDT_MAGIC:
            found = data[:4].hex() or "nothing"
            raise DeviceTreeError(
                f"DTB offset 0x0: expected magic d00dfeed, found {found}",
                hint="not a flattened device tree (.dtb/.dtbo)",
            )
        if len(data) < _HEADER.size:
            raise DeviceTreeError(
                f"DTB offset 0x0: expected a {_HEADER.size}-byte header, blob "
                f"is {len(data)} bytes (truncated)"
            )
        h = dict(zip(_HEADER_FIELDS, _HEADER.unpack_from(data, 0), strict=True))

        def bad(field: str, expected: str) -> DeviceTreeError:
            at = 4 * _HEADER_FIELDS.index(field)
            return DeviceTreeError(
                f"DTB offset {at:#x} ({field} = {h[field]:#x}): expected {expected}"
            )

        if h["version"] < 16:
            raise bad("version", "16 or 17 (older layouts are not supported)")
        if h["last_comp_version"] > 17:
            raise bad("last_comp_version", "<= 17")
        hdr_size = _HEADER.size if h["version"] >= 17 else _HEADER.size - 4
        total = h["totalsize"]
        if total < hdr_size or total > len(data):
            raise bad(
                "totalsize",
                f">= {hdr_size:#x} and <= the {len(data):#x} bytes available (truncated blob?)",
            )
        if h["version"] < 17:
            h["size_dt_struct"] = max(0, total - h["off_dt_struct"])
        for off_field, size_field in (
            ("off_dt_struct", "size_dt_struct"),
            ("off_dt_strings", "size_dt_strings"),
            ("off_mem_rsvmap", ""),
        ):
            off, size = h[off_field], h.get(size_field, 0)
            if off < hdr_size or off + size > total:
                raise bad(
                    off_field,
                    f"a block (size {size:#x}) inside [{hdr_size:#x}, totalsize {total:#x}]",
                )
        if h["off_dt_struct"] % 4:
            raise bad("off_dt_struct", "a 4-byte aligned offset")
        fdt = cls(boot_cpuid_phys=h["boot_cpuid_phys"])
        off = h["off_mem_rsvmap"]
        while True:
            if off + _RSV_ENTRY.size > total:
                raise DeviceTreeError(
                    f"DTB offset {off:#x}: expected a 16-byte /memreserve/ "
                    f"entry (or the terminator, size 0), blob ends at {total:#x}"
                )
            addr, size = _RSV_ENTRY.unpack_from(data, off)
            off += _RSV_ENTRY.size
            if size == 0:  # the spec writes 0,0; libfdt and dtc stop at any size 0
                break
            fdt.memreserve.append((addr, size))
        fdt.root = _parse_struct(rd, h)
        return fdt

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Fdt:
        with open(path, "rb") as f:
            return cls.from_bytes(f.read())

    # -- blob out ----------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """Version-17 DTB whose ``totalsize`` is exactly its length (no padding)."""
        strings = bytearray()
        cache: dict[str, int] = {}

        def nameoff(name: str) -> int:
            if name not in cache:
                raw = name.encode("ascii") + b"\0"
                pos = strings.find(raw)  # like dtc: share a suffix of an existing string
                if pos < 0:
                    pos = len(strings)
                    strings.extend(raw)
                cache[name] = pos
            return cache[name]

        out = bytearray()

        def emit(node: Node, is_root: bool = False) -> None:
            if not is_root:
                check_name(node.name, "node name")
            name = b"\0" if is_root else node.name.encode("ascii") + b"\0"
            out.extend(_U32.pack(FDT_BEGIN_NODE) + name + b"\0" * (_align4(len(name)) - len(name)))
            for prop in node.properties.values():
                check_name(prop.name, "property name")
                out.extend(struct.pack(">III", FDT_PROP, len(prop.value), nameoff(prop.name)))
                out.extend(prop.value + b"\0" * (_align4(len(prop.value)) - len(prop.value)))
            for child in node.children.values():
                emit(child)
            out.extend(_U32.pack(FDT_END_NODE))

        emit(self.root, is_root=True)
        out.extend(_U32.pack(FDT_END))
        rsv = b"".join(_RSV_ENTRY.pack(a, s) for a, s in self.memreserve) + _RSV_ENTRY.pack(0, 0)
        off_struct = _HEADER.size + len(rsv)
        off_strings = off_struct + len(out)
        total = off_strings + len(strings)
        header = _HEADER.pack(
            FDT_MAGIC,
            total,
            off_struct,
            off_strings,
            _HEADER.size,
            17,
            16,
            self.boot_cpuid_phys,
            len(strings),
            len(out),
        )
        return header + rsv + bytes(out) + bytes(strings)

    def write(self, path: str | os.PathLike[str]) -> None:
        data = self.to_bytes()
        with open(path, "wb") as f:
            f.write(data)

    # -- lookup ------------------------------------------------------------------------
    def find(self, path: str) -> Node | None:
        """libfdt ``fdt_path_offset`` semantics (see module docstring); None if absent."""
        node: Node | None = self.root
        rest = path
        if not path.startswith("/"):
            alias, _, rest = path.partition("/")
            aliases = self.root.find_child("aliases")
            target = aliases.get(alias) if aliases else None
            if target is None or not alias:
                return None
            try:
                target_path = target.as_string()
            except DeviceTreeError:
                return None
            if not target_path.startswith("/"):
                return None
            node = self.find(target_path)
        for part in rest.split("/"):
            if part and node is not None:
                node = node.find_child(part)
        return node

    def get(self, path: str) -> Node:
        """Like :meth:`find` but a missing node is a :class:`DeviceTreeError`."""
        node = self.find(path)
        if node is None:
            raise DeviceTreeError(f"no node at path {path!r}")
        return node

    def walk(self) -> Iterator[tuple[str, Node]]:
        return self.root.walk("/")

    def path_of(self, node: Node) -> str:
        for path, candidate in self.walk():
            if candidate is node:
                return path
        raise DeviceTreeError(f"node {node.name!r} is not in this tree")

    def cells(self, path: str) -> tuple[int, int]:
        """(#address-cells, #size-cells) that apply to the *children* of ``path``
        (defaults 2 and 1, as the DT spec says)."""
        node = self.get(path)
        ac, sc = node.get("#address-cells"), node.get("#size-cells")
        return (ac.as_u32() if ac else 2, sc.as_u32() if sc else 1)

    # -- phandles ----------------------------------------------------------------------
    def max_phandle(self) -> int:
        """Largest phandle in use (0 if none), like libfdt's ``fdt_find_max_phandle``."""
        return max((n.phandle or 0 for _, n in self.walk()), default=0)

    def by_phandle(self, phandle: int) -> Node | None:
        for _, node in self.walk():
            if node.phandle == phandle:
                return node
        return None

    def allocate_phandle(self) -> int:
        """A new phandle: one past the largest in use."""
        candidate = self.max_phandle() + 1
        if candidate > PHANDLE_MAX:
            raise DeviceTreeError(f"no phandle left: largest in use is {candidate - 1:#x}")
        return candidate

    def assign_phandle(self, node: Node) -> int:
        """The node's phandle, giving it a new one (appended ``phandle``) if it has none."""
        existing = node.phandle
        if existing is not None:
            return existing
        phandle = self.allocate_phandle()
        node.set(Property.from_u32("phandle", phandle))
        return phandle

    # -- misc --------------------------------------------------------------------------
    def copy(self) -> Fdt:
        return Fdt(self.root.copy(), self.boot_cpuid_phys, list(self.memreserve))

    def same_as(self, other: Fdt) -> bool:
        return (
            self.boot_cpuid_phys == other.boot_cpuid_phys
            and self.memreserve == other.memreserve
            and self.root.same_as(other.root)
        )

    def to_dts(self, *, plugin: bool = False, comment: str = "") -> str:
        """Readable DTS that dtc accepts: strings as text, cells in hex, other data as
        bytes; labels and ``&label`` references where the tree has them.
        ``boot_cpuid_phys`` has no DTS syntax; it is noted in a comment (dtc ``-b``)."""
        lines = ["/dts-v1/;"]
        if plugin:
            lines.append("/plugin/;")
        lines += [f"// {line}".rstrip() for line in comment.splitlines()]
        if self.boot_cpuid_phys:
            lines.append(f"// boot_cpuid_phys: {self.boot_cpuid_phys:#x} (dtc -b)")
        lines += [f"/memreserve/ {a:#x} {s:#x};" for a, s in self.memreserve]
        lines.append("")
        dts_node(self.root, 0, lines)
        return "\n".join(lines) + "\n"


def _parse_struct(rd: _Reader, h: dict[str, int]) -> Node:
    data = rd.data
    start, end = h["off_dt_struct"], h["off_dt_struct"] + h["size_dt_struct"]
    str_start, str_end = h["off_dt_strings"], h["off_dt_strings"] + h["size_dt_strings"]
    stack: list[Node] = []
    root: Node | None = None
    pos = start
    while True:
        tok_off = pos
        tok = rd.u32(pos, end, "a structure-block token (FDT_END missing?)")
        pos += 4
        if tok == FDT_NOP:
            continue
        where = f"DTB offset {tok_off:#x}"
        if tok == FDT_BEGIN_NODE:
            name, name_end = rd.cstring(pos, end, "node name")
            pos = _align4(name_end + 1)
            if root is not None and not stack:
                raise DeviceTreeError(
                    f"{where}: expected FDT_END after the root node, "
                    f"found a second top-level node {name!r}"
                )
            if not stack:
                if name not in ("", "/"):
                    raise DeviceTreeError(
                        f"{where}: expected the root node (empty name), found {name!r}"
                    )
                root = Node("")
                stack.append(root)
                continue
            if not _NAME_RE.match(name):
                raise DeviceTreeError(
                    f"{where}: expected a node name of [a-zA-Z0-9,._+*#?@-], found {name!r}"
                )
            parent = stack[-1]
            if name in parent.children:
                raise DeviceTreeError(f"{where}: duplicate node name {name!r}")
            if len(stack) >= MAX_DEPTH:
                raise DeviceTreeError(f"{where}: node {name!r} nests deeper than {MAX_DEPTH}")
            node = Node(name)
            parent.children[name] = node
            stack.append(node)
        elif tok == FDT_PROP:
            if not stack:
                raise DeviceTreeError(
                    f"{where}: expected FDT_BEGIN_NODE, found FDT_PROP outside any node"
                )
            node = stack[-1]
            if node.children:
                raise DeviceTreeError(
                    f"{where}: expected FDT_BEGIN_NODE or FDT_END_NODE, found "
                    f"FDT_PROP after a subnode of {node.name or '/'!r}"
                )
            length = rd.u32(pos, end, "property length")
            nameoff = rd.u32(pos + 4, end, "property name offset")
            pos += 8
            if pos + length > end:
                raise DeviceTreeError(
                    f"{where}: property value of {length:#x} bytes at "
                    f"{pos:#x} runs past the structure block end {end:#x}"
                )
            if nameoff >= h["size_dt_strings"]:
                raise DeviceTreeError(
                    f"{where}: property name offset {nameoff:#x} is outside "
                    f"the strings block (size {h['size_dt_strings']:#x})"
                )
            name, _ = rd.cstring(str_start + nameoff, str_end, "property name")
            if not _NAME_RE.match(name):
                raise DeviceTreeError(
                    f"DTB offset {str_start + nameoff:#x}: expected a property"
                    f" name of [a-zA-Z0-9,._+*#?@-], found {name!r}"
                )
            if name in node.properties:
                raise DeviceTreeError(
                    f"{where}: duplicate property {name!r} in node {node.name or '/'!r}"
                )
            node.properties[name] = Property(name, data[pos : pos + length])
            pos = _align4(pos + length)
        elif tok == FDT_END_NODE:
            if not stack:
                raise DeviceTreeError(
                    f"{where}: expected FDT_BEGIN_NODE, found FDT_END_NODE with no node open"
                )
            stack.pop()
        elif tok == FDT_END:
            if root is None or stack:
                state = "no root node" if root is None else f"{len(stack)} node(s) still open"
                raise DeviceTreeError(f"{where}: expected FDT_END_NODE, found FDT_END ({state})")
            return root
        else:
            raise DeviceTreeError(
                f"{where}: expected a token (FDT_BEGIN_NODE 0x1, FDT_END_NODE "
                f"0x2, FDT_PROP 0x3, FDT_NOP 0x4, FDT_END 0x9), found {tok:#x}"
            )
