"""Device-tree overlays: build them in source form, compile them to a .dtbo, apply them.

An :class:`Overlay` is the source form (what a ``/plugin/`` DTS says): fragments, each with a
``target-path`` (or ``target = <&label>``) and an ``__overlay__`` node to fill, where nodes
may carry labels and property cells may be :class:`~edgevirt.devicetree.fdt.Ref` label
references. :meth:`Overlay.to_fdt` compiles it exactly as ``dtc -@`` compiles the same DTS
(phandles 1, 2, ... in reference order, then to the other labelled nodes; ``__symbols__``,
``__fixups__`` for labels not defined in the overlay, ``__local_fixups__`` for those that
are), so the .dtbo also applies with fdtoverlay, U-Boot and Linux.

:func:`apply_overlay` applies a compiled overlay with the semantics of libfdt's
``fdt_overlay_apply`` (dtc 1.7.2), step for step: shift the overlay's phandles past the
base's largest, patch ``__local_fixups__``, resolve ``__fixups__`` through the base's
``__symbols__``, keep the phandle of a base node that an overlay node with its own phandle
merges into (the overlay's references to it follow; dtc 1.6.1 overwrote the base's phandle,
breaking the base's references), merge each fragment into its target (new properties and
subnodes go first, as libfdt inserts them; existing properties are replaced), then merge
``__symbols__``. pylibfdt is the oracle of the differential fuzz target (fuzz/fuzz_fdt.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from edgevirt.devicetree.fdt import Fdt, Node, Property, Ref, check_label
from edgevirt.errors import DeviceTreeError

__all__ = ["Overlay", "apply_overlay", "compile_overlay"]

_U32 = struct.Struct(">I")
UNRESOLVED = 0xFFFFFFFF  # placeholder dtc writes for a reference resolved at apply time


@dataclass
class Overlay:
    """An overlay in source form. ``description`` becomes a comment atop the DTS."""

    description: str = ""
    root: Node = field(default_factory=lambda: Node(""))

    def add_fragment(
        self, target_path: str | None = None, *, target_label: str | None = None
    ) -> Node:
        """Append ``fragment@N`` targeting a base path or a base label; return its
        ``__overlay__`` node for the caller to fill."""
        if (target_path is None) == (target_label is None):
            raise DeviceTreeError("a fragment needs exactly one of target_path, target_label")
        frag = Node(f"fragment@{len(self.root.children)}")
        if target_path is not None:  # a path, or (as libfdt allows) alias[/rest]
            frag.set(Property.from_string("target-path", target_path))
        else:
            assert target_label is not None
            frag.set(Property.from_u32("target", Ref(target_label)))
        self.root.add_child(frag)
        return frag.add_child(Node("__overlay__"))

    @property
    def fragments(self) -> list[Node]:
        return list(self.root.children.values())

    def to_fdt(self) -> Fdt:
        """The compiled overlay (.dtbo tree), as ``dtc -@`` makes it from :meth:`to_dts`."""
        return compile_overlay(self.root)

    def to_dtbo(self) -> bytes:
        return self.to_fdt().to_bytes()

    def to_dts(self) -> str:
        """``/plugin/`` DTS source with labels and ``&label`` references."""
        return Fdt(self.root).to_dts(plugin=True, comment=self.description)


def compile_overlay(source: Node) -> Fdt:
    """Resolve labels like ``dtc -@`` does for a ``/plugin/``: local references get the
    target's phandle (assigned 1, 2, ... in reference order), the others 0xffffffff and a
    ``__fixups__`` entry; every label gets a ``__symbols__`` entry."""
    root = source.copy()
    tree = Fdt(root)
    labels: dict[str, tuple[str, Node]] = {}
    for path, node in tree.walk():
        for label in node.labels:
            check_label(label)
            if label in labels:
                raise DeviceTreeError(f"label {label!r} is on both {labels[label][0]} and {path}")
            labels[label] = (path, node)
    used = {n.phandle for _, n in tree.walk()} - {None}
    next_phandle = 1
    fixups: dict[str, list[str]] = {}
    local_fixups = Node("__local_fixups__")
    for path, node in list(tree.walk()):
        for name, prop in list(node.properties.items()):
            if not prop.refs:
                continue
            value = bytearray(prop.value)
            for off, label in sorted(prop.refs):
                if off % 4 or off + 4 > len(value):
                    raise DeviceTreeError(
                        f"{path}:{name}: reference &{label} at byte {off} is not on a whole cell"
                    )
                if label not in labels:
                    fixups.setdefault(label, []).append(f"{path}:{name}:{off}")
                    _U32.pack_into(value, off, UNRESOLVED)
                    continue
                target = labels[label][1]
                phandle = target.phandle
                if phandle is None:
                    while next_phandle in used:
                        next_phandle += 1
                    phandle = next_phandle
                    used.add(phandle)
                    target.set(Property.from_u32("phandle", phandle))
                _U32.pack_into(value, off, phandle)
                mirror = local_fixups
                for part in path.strip("/").split("/") if path != "/" else []:
                    mirror = mirror.child(part) or mirror.add_child(Node(part))
                old = mirror.get(name)
                mirror.set(Property(name, (old.value if old else b"") + _U32.pack(off)))
            node.properties[name] = Property(name, bytes(value))
    # dtc -@ gives every labelled node a phandle (after the referenced ones, in tree order)
    # so that later overlays can reference it through __symbols__.
    for _, node in tree.walk():
        if node.labels and node.phandle is None:
            while next_phandle in used:
                next_phandle += 1
            used.add(next_phandle)
            node.set(Property.from_u32("phandle", next_phandle))
        node.labels = []
    if labels:
        symbols = root.add_child(Node("__symbols__"))
        for label, (path, _) in labels.items():
            symbols.set(Property.from_string(label, path))
    if fixups:
        node = root.add_child(Node("__fixups__"))
        for label, entries in fixups.items():
            node.set(Property.from_strings(label, entries))
    if local_fixups.children or local_fixups.properties:
        root.add_child(local_fixups)
    return tree


# -- application (libfdt fdt_overlay_apply) ----------------------------------------------


def apply_overlay(base: Fdt, overlay: Fdt | Overlay) -> Fdt:
    """A new tree: ``base`` with ``overlay`` applied (neither argument is modified)."""
    fdto = overlay.to_fdt() if isinstance(overlay, Overlay) else overlay.copy()
    fdt = base.copy()
    delta = fdt.max_phandle()
    _adjust_phandles(fdto.root, delta)
    local = fdto.root.find_child("__local_fixups__")
    if local is not None:
        _update_local_references(fdto.root, local, delta, "")
    _fixup_phandles(fdt, fdto)
    _prevent_phandle_overwrite(fdt, fdto)
    for frag in fdto.root.children.values():
        ov = frag.find_child("__overlay__")
        if ov is not None:
            target, _ = _target(fdt, frag)
            _merge_node(target, ov)
    _update_symbols(fdt, fdto)
    return fdt


def _adjust_phandles(node: Node, delta: int) -> None:
    for key in ("phandle", "linux,phandle"):
        prop = node.get(key)
        if prop is None:
            continue
        if len(prop.value) != 4:
            raise DeviceTreeError(
                f"overlay node {node.name!r}: {key} is {len(prop.value)} bytes, expected 4"
            )
        value = prop.as_u32() + delta
        if value >= UNRESOLVED:
            raise DeviceTreeError(
                f"overlay node {node.name!r}: {key} {prop.as_u32():#x} + "
                f"base max phandle {delta:#x} leaves the phandle space"
            )
        node.properties[key] = Property(key, _U32.pack(value))
    for child in node.children.values():
        _adjust_phandles(child, delta)


def _update_local_references(tree: Node, fixup: Node, delta: int, path: str) -> None:
    for name, prop in fixup.properties.items():
        where = f"__local_fixups__{path or '/'}:{name}"
        if len(prop.value) % 4:
            raise DeviceTreeError(
                f"{where}: offsets must be u32 cells, value is {len(prop.value)} bytes"
            )
        target = tree.get(name)
        if target is None:
            raise DeviceTreeError(f"{where}: overlay node {path or '/'} has no property {name!r}")
        value = bytearray(target.value)
        for off in prop.as_u32_list():
            if off + 4 > len(value):
                raise DeviceTreeError(
                    f"{where}: offset {off} is beyond the {len(value)}-byte property"
                )
            _U32.pack_into(value, off, (_U32.unpack_from(value, off)[0] + delta) & 0xFFFFFFFF)
        tree.properties[name] = Property(name, bytes(value))
    for child_name, child_fixup in fixup.children.items():
        child = tree.find_child(child_name)
        if child is None:
            raise DeviceTreeError(
                f"__local_fixups__{path}/{child_name}: the overlay has no node {path}/{child_name}"
            )
        _update_local_references(child, child_fixup, delta, f"{path}/{child_name}")


def _fixup_phandles(fdt: Fdt, fdto: Fdt) -> None:
    fixups = fdto.root.find_child("__fixups__")
    if fixups is None:
        return
    symbols = fdt.root.find_child("__symbols__")
    for label, prop in fixups.properties.items():
        entries = _fixup_entries(label, prop)
        used_at = ", ".join(e[0] for e in entries[:3]) + (" ..." if len(entries) > 3 else "")
        if symbols is None:
            raise DeviceTreeError(
                f"__fixups__: label {label!r} (used at {used_at}) cannot be resolved: the base "
                f"tree has no __symbols__",
                hint="QEMU's DTB has no labels; target base nodes by path (target-path)",
            )
        sym = symbols.get(label)
        if sym is None:
            raise DeviceTreeError(
                f"__fixups__: label {label!r} (used at {used_at}) is not in the base's __symbols__"
            )
        sym_path = sym.as_string()
        dt_ascii(sym.value[:-1], f"base __symbols__: property {label!r}")
        node = fdt.find(sym_path)
        if node is None or node.phandle is None:
            missing = "no node" if node is None else "a node without phandle"
            raise DeviceTreeError(
                f"__fixups__: label {label!r} -> {sym_path!r} is {missing} in the base"
            )
        for entry, path, pname, off in entries:
            target = fdto.find(path)
            if target is None:
                raise DeviceTreeError(
                    f"__fixups__: {label} entry {entry!r}: the overlay has no node {path!r}"
                )
            tprop = target.get(pname)
            if tprop is None or off + 4 > len(tprop.value):
                raise DeviceTreeError(
                    f"__fixups__: {label} entry {entry!r}: property "
                    f"{pname!r} is missing or shorter than {off + 4} bytes"
                )
            value = bytearray(tprop.value)
            _U32.pack_into(value, off, node.phandle)
            target.properties[pname] = Property(pname, bytes(value))


def _fixup_entries(label: str, prop: Property) -> list[tuple[str, str, str, int]]:
    """(entry, path, property, offset) of each ``path:property:offset`` entry."""
    if not prop.value.endswith(b"\0"):
        raise DeviceTreeError(f"__fixups__: {label!r} is not a string list")
    texts = dt_ascii(prop.value[:-1], f"__fixups__: property {label!r}").split("\0")
    entries = []
    for entry in texts:
        path, sep, rest = entry.partition(":")
        pname, sep2, off = rest.partition(":")
        if not (path and sep and pname and sep2 and off.isdigit() and off.isascii()):
            raise DeviceTreeError(
                f"__fixups__: {label!r} entry {entry!r} is not 'path:property:offset'"
            )
        entries.append((entry, path, pname, int(off)))
    return entries


def dt_ascii(raw: bytes, where: str) -> str:
    """``raw`` as a path or label string: printable ASCII (NULs separate list items).

    libfdt compares such strings byte for byte; decoding with replacement characters would
    target (or record) a different node, so any other byte is an error naming its offset.
    """
    for i, b in enumerate(raw):
        if b and not 0x20 <= b < 0x7F:
            raise DeviceTreeError(
                f"{where}: byte {b:#04x} at offset {i} of the value is not printable ASCII "
                f"(paths and labels are ASCII): …{raw[max(0, i - 32) : i + 8]!r}"
            )
    return raw.decode("ascii")


def _target(fdt: Fdt, frag: Node) -> tuple[Node, str | None]:
    """The base node a fragment targets, and its ``target-path`` if it has one."""
    tprop = frag.get("target")
    if tprop is not None:
        if len(tprop.value) != 4 or tprop.as_u32() == UNRESOLVED:
            raise DeviceTreeError(
                f"{frag.name}: target is {tprop.value.hex()!r}, not a resolved phandle"
            )
        phandle = tprop.as_u32()
        if phandle:
            node = fdt.by_phandle(phandle)
            if node is None:
                raise DeviceTreeError(
                    f"{frag.name}: target phandle {phandle:#x} is not in the base"
                )
            return node, None
    pprop = frag.get("target-path")
    if pprop is None:
        raise DeviceTreeError(f"{frag.name}: has __overlay__ but neither target nor target-path")
    path = dt_ascii(pprop.value.split(b"\0", 1)[0], f"{frag.name}: property 'target-path'")
    node = fdt.find(path)
    if node is None:
        raise DeviceTreeError(f"{frag.name}: target-path {path!r} is not in the base")
    return node, path


def _phandle(node: Node) -> int:
    """libfdt's ``fdt_get_phandle``: ``phandle``, else ``linux,phandle``, if 4 bytes; else 0."""
    for key in ("phandle", "linux,phandle"):
        prop = node.get(key)
        if prop is not None and len(prop.value) == 4:
            return prop.as_u32()
    return 0


def _prevent_phandle_overwrite(fdt: Fdt, fdto: Fdt) -> None:
    local = fdto.root.find_child("__local_fixups__")
    for frag in fdto.root.children.values():
        ov = frag.find_child("__overlay__")
        if ov is None:
            continue
        try:
            target, _ = _target(fdt, frag)
        except DeviceTreeError:
            continue  # the merge below reports a fragment without a target
        _keep_base_phandle(target, ov, fdto, local)


def _keep_base_phandle(base: Node, ov: Node, fdto: Fdt, local: Node | None) -> None:
    mine, theirs = _phandle(base), _phandle(ov)
    if mine and theirs:
        for key in ("phandle", "linux,phandle"):
            prop = ov.get(key)
            if prop is not None and len(prop.value) == 4:
                ov.properties[key] = Property(key, _U32.pack(mine))
        if local is not None:
            _replace_references(fdto.root, local, theirs, mine)
    for name, child in ov.children.items():
        base_child = base.find_child(name)
        if base_child is not None:  # a new node overwrites nothing
            _keep_base_phandle(base_child, child, fdto, local)


def _replace_references(tree: Node, fixup: Node, old: int, new: int) -> None:
    """Every ``__local_fixups__`` location in the overlay holding ``old`` now holds ``new``
    (the offsets were checked by :func:`_update_local_references`)."""
    for name, prop in fixup.properties.items():
        target = tree.get(name)
        if target is None:
            continue
        value = bytearray(target.value)
        for off in prop.as_u32_list():
            if off + 4 <= len(value) and _U32.unpack_from(value, off)[0] == old:
                _U32.pack_into(value, off, new)
        tree.properties[name] = Property(name, bytes(value))
    for child_name, child_fixup in fixup.children.items():
        child = tree.find_child(child_name)
        if child is not None:
            _replace_references(child, child_fixup, old, new)


def _merge_node(target: Node, ov: Node) -> None:
    for prop in ov.properties.values():
        target.set(prop, front=True)
    for child in ov.children.values():
        existing = target.find_child(child.name)
        if existing is None:
            existing = target.add_child(Node(child.name), front=True)
        _merge_node(existing, child)


def _update_symbols(fdt: Fdt, fdto: Fdt) -> None:
    ov_sym = fdto.root.find_child("__symbols__")
    if ov_sym is None:
        return
    root_sym = fdt.root.find_child("__symbols__")
    if root_sym is None:
        root_sym = fdt.root.add_child(Node("__symbols__"), front=True)
    for label, prop in ov_sym.properties.items():
        value = prop.value
        if not value or value.find(b"\0") != len(value) - 1 or value[:1] != b"/":
            raise DeviceTreeError(f"overlay __symbols__: {label!r} is not an absolute path")
        path = dt_ascii(value[:-1], f"overlay __symbols__: property {label!r}")
        frag_name, slash, rest = path[1:].partition("/")
        if not slash:
            continue  # symbol that will not end up in the target tree
        if rest == "__overlay__":
            rel = ""
        elif rest.startswith("__overlay__/") and len(rest) > len("__overlay__/"):
            rel = rest[len("__overlay__/") :]
        else:
            continue
        frag = fdto.root.find_child(frag_name)
        if frag is None or frag.find_child("__overlay__") is None:
            raise DeviceTreeError(
                f"overlay __symbols__: {label!r} -> {path!r}: no fragment "
                f"{frag_name!r} with __overlay__"
            )
        node, target_path = _target(fdt, frag)
        prefix = target_path if target_path is not None else fdt.path_of(node)
        full = ("" if prefix == "/" else prefix) + "/" + rel
        root_sym.set(Property.from_string(label, full), front=True)
