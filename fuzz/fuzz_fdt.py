"""atheris target: the FDT parser and overlay apply, differential against libfdt.

Structure-aware: the input builds a base tree (nodes, cells, strings, phandles, labels in
``__symbols__``, aliases) and an overlay with edgevirt's own ``Overlay`` (fragments by path,
alias or label; new nodes with labels; references to local and base labels), both compiled
to blobs, then a few byte mutations land in either blob (half of them in the overlay's
structure and strings blocks). Then:

- edgevirt parses both and applies the overlay: only ``DeviceTreeError`` may come out;
- libfdt (pylibfdt, in a child process: it segfaults on some inputs) checks both with
  ``fdt_check_full`` and applies with ``fdt_overlay_apply``;
- when both succeed the trees must be identical: same nodes in the same order, same
  properties in the same order with the same bytes, same reservations;
- when libfdt accepts and edgevirt refuses, edgevirt's message must name one of its
  documented stricter rules (:data:`STRICTER`); the other way round is a bug unless libfdt
  refused its input in ``fdt_check_full`` for a rule edgevirt does not enforce (counted).

    PYTHONPATH=. .venv/bin/python fuzz/fuzz_fdt.py fuzz/corpus/fdt -max_len=1024
"""

import atexit
import os
import re
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guard import Guard  # noqa: E402
from libfdt_oracle import Oracle  # noqa: E402

with atheris.instrument_imports(include=["edgevirt"]):
    from edgevirt.devicetree.fdt import Fdt, Node, Property, Ref
    from edgevirt.devicetree.overlay import Overlay, apply_overlay
    from edgevirt.errors import DeviceTreeError

#: edgevirt refuses these where libfdt goes on (DESIGN §6: bad input is an error naming it).
STRICTER = re.compile(
    r"not printable ASCII|expected an ASCII|defined twice|duplicate|more than once|"
    r"expected a (property|node) name of|/memreserve/|"
    r"__local_fixups__|__fixups__|phandle|__symbols__|not an absolute path|target|"
    r"expected .*cell|u32|invalid|empty|NUL|string"
)
NAMES = ["a", "bus@1000", "dev@0", "dev@1", "chosen", "aliases", "x@ffffffff", "__overlay__",
         "__symbols__", "__fixups__", "__local_fixups__", "fragment@0", "n"]  # fmt: skip
PROPS = ["reg", "compatible", "status", "phandle", "interrupts", "link", "target-path",
         "target", "#address-cells", "name", "x"]  # fmt: skip
LABELS = ["l0", "l1", "base0", "base1", "missing"]

SURVEY = os.environ.get("EDGEVIRT_FUZZ_SURVEY")
survey: list[str] = []


guard = Guard(allowed=(DeviceTreeError,))
oracle = Oracle()
atexit.register(oracle.close)
stats = {"both_ok": 0, "libfdt_rejects_ours_ok": 0, "ours_stricter": 0, "libfdt_crash": 0}


def _value(fdp: atheris.FuzzedDataProvider, name: str) -> Property:
    kind = fdp.ConsumeIntInRange(0, 4)
    if kind == 0:
        return Property.from_u32(
            name, *fdp.ConsumeIntListInRange(fdp.ConsumeIntInRange(1, 3), 0, 9)
        )
    if kind == 1:
        return Property.from_string(name, fdp.PickValueInList(["okay", "/bus@1000", "a,b", ""]))
    if kind == 2:
        return Property(name, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 12)))
    if kind == 3:
        return Property.empty(name)
    return Property.from_u32(name, Ref(fdp.PickValueInList(LABELS)), 1)


def _fill(fdp: atheris.FuzzedDataProvider, node: Node, depth: int, labels: bool) -> None:
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        prop = _value(fdp, fdp.PickValueInList(PROPS))
        if prop.refs and not labels:
            continue
        node.set(prop)
    if depth < 3:
        for _ in range(fdp.ConsumeIntInRange(0, 2)):
            name = fdp.PickValueInList(NAMES)
            if node.find_child(name) is None:
                child = node.add_child(Node(name))
                if labels and fdp.ConsumeBool():
                    child.labels = [fdp.PickValueInList(LABELS[:2])]
                _fill(fdp, child, depth + 1, labels)


def _base(fdp: atheris.FuzzedDataProvider) -> bytes:
    fdt = Fdt(memreserve=[(0x1000, 0x100)] if fdp.ConsumeBool() else [])
    _fill(fdp, fdt.root, 0, labels=False)
    bus = fdt.root.find_child("bus@1000") or fdt.root.add_child(Node("bus@1000"))
    bus.set(Property.from_u32("phandle", 1))
    dev = bus.find_child("dev@0") or bus.add_child(Node("dev@0"))
    dev.set(Property.from_u32("phandle", 2))
    if fdp.ConsumeBool():
        sym = fdt.root.find_child("__symbols__") or fdt.root.add_child(Node("__symbols__"))
        sym.set(Property.from_string("base0", "/bus@1000"))
        sym.set(Property.from_string("base1", "/bus@1000/dev@0"))
    if fdp.ConsumeBool():
        al = fdt.root.find_child("aliases") or fdt.root.add_child(Node("aliases"))
        al.set(Property.from_string("serial0", "/bus@1000/dev@0"))
    return fdt.to_bytes()


def _overlay(fdp: atheris.FuzzedDataProvider) -> bytes:
    ov = Overlay()
    for _ in range(fdp.ConsumeIntInRange(1, 3)):
        how = fdp.ConsumeIntInRange(0, 2)
        if how == 0:
            target = fdp.PickValueInList(["/", "/bus@1000", "/bus@1000/dev@0", "/nope", "serial0"])
            node = ov.add_fragment(target)
        else:
            node = ov.add_fragment(target_label=fdp.PickValueInList(LABELS[2:]))
        _fill(fdp, node, 1, labels=True)
    try:
        return ov.to_dtbo()
    except DeviceTreeError:  # e.g. a label on two nodes: the compiler refuses, fine
        return b""


def _mutate(fdp: atheris.FuzzedDataProvider, blob: bytes) -> bytes:
    out = bytearray(blob)
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        if len(out) > 40:
            pos = fdp.ConsumeIntInRange(40, len(out) - 1)  # past the header, mostly
            out[pos] = fdp.PickValueInList(
                [0, 1, 2, 3, 9, 0x80, 0xFF, fdp.ConsumeIntInRange(0, 255)]
            )
    return bytes(out)


def ours(base: bytes, overlay: bytes) -> tuple[str, object]:
    try:
        b = Fdt.from_bytes(base)
        if not overlay:
            tree = b
        else:
            tree = apply_overlay(b, Fdt.from_bytes(overlay))
    except DeviceTreeError as e:
        return "error", str(e)
    nodes = [
        (path, [(n, p.value) for n, p in node.properties.items()]) for path, node in tree.walk()
    ]
    return "ok", (list(tree.memreserve), nodes)


def compare(base: bytes, overlay: bytes) -> None:
    op = "apply" if overlay else "parse"
    mine = ours(base, overlay)
    theirs = oracle.ask(op, base, overlay)
    if theirs[0] == "crash":
        stats["libfdt_crash"] += 1
        return
    if mine[0] == "ok" and theirs[0] == "ok":
        stats["both_ok"] += 1
        assert mine[1] == theirs[1], f"trees differ:\nedgevirt {mine[1]}\nlibfdt   {theirs[1]}"
    elif mine[0] == "error" and theirs[0] == "ok":
        stats["ours_stricter"] += 1
        if SURVEY is not None:  # EDGEVIRT_FUZZ_SURVEY=file: list the refusals, do not fail
            survey.append(re.sub(r"0x[0-9a-f]+|\d+", "N", str(mine[1]))[:160])
            return
        assert STRICTER.search(str(mine[1])), f"libfdt accepts, edgevirt refuses: {mine[1]}"
    elif mine[0] == "ok" and theirs[0] in ("reject", "error"):
        stats["libfdt_rejects_ours_ok"] += 1


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    base = _base(fdp)
    overlay = _overlay(fdp) if fdp.ConsumeBool() else b""
    if fdp.ConsumeBool():
        overlay = _mutate(fdp, overlay) if overlay and fdp.ConsumeBool() else overlay
        base = _mutate(fdp, base) if not overlay or fdp.ConsumeBool() else base
    n = len(survey)
    guard.run(lambda out: compare(base, overlay))
    if SURVEY is not None and len(survey) > n:  # outside the guard: not the target's write
        with open(SURVEY, "a") as f:
            f.write(survey[-1] + "\n")


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
