"""atheris target: the Xen dom0less host-DT loader (``devicetree/xen.py``: ``host_ram``,
``validate``, ``partial_dt``, ``compose_xen``) and what turns a layout into a
:class:`XenSystem` (``platforms/xen_system.py``).

Structure-aware: the input builds a base DTB (root cell sizes, ``/memory`` nodes with banks
at boundary addresses, sometimes a pre-existing ``/reserved-memory`` or ``/chosen`` child,
then a few byte mutations of the blob) and either the shipped system from a
:class:`XenLayout` with boundary values, or a free :class:`XenSystem`: domains (names,
memory, cpus, kernel/ramdisk files of odd sizes, passthrough nodes naming regions),
regions (host, size, guest, domains), static event channels, bootargs and a module base.

Invariants: fuzz/guard.py (only edgevirt's exceptions, time-bounded, nothing written outside
the output directory) and, when ``compose_xen`` succeeds:

- the written host DTB parses, has the RAM ``compose_xen`` reported and the bootargs given;
- every ``no-map`` node under ``/reserved-memory`` lies inside host RAM and overlaps neither
  Xen's load area, nor a module of the load plan, nor another ``no-map`` node; every module
  lies inside RAM, clear of Xen and of the other modules;
- every domain's partial DTB parses and each ``/passthrough`` child's ``xen,reg`` is exactly
  (host, size, guest) of the regions it names, its ``reg`` their guest windows, and every
  region it names is one the system maps into that domain.

    PYTHONPATH=. .venv/bin/python fuzz/fuzz_xen.py fuzz/corpus/xen -max_len=1024
"""

import sys
from pathlib import Path
from typing import Any

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guard import Guard  # noqa: E402

with atheris.instrument_imports(include=["edgevirt"]):
    from edgevirt.devicetree import xen
    from edgevirt.devicetree.fdt import Fdt, Node, Property
    from edgevirt.platforms import xen_system as xs

RAM0 = 0x40000000
PAGE = 0x1000
ADDRS = [0, RAM0, RAM0 + 0x2000000, 0x48000000, 0x50000000, 0x5FFFF000, 0x60000000,
         0x80000000, 0xA0000000, 0xBFFFF000, 0xC0000000, 1 << 32, (1 << 32) - 0x1000,
         (1 << 64) - 0x1000, 0x3A000000, 0x3C000000, 0x3FFFF000]  # fmt: skip
SIZES = [0, 1, 0x1000, 0x10000, 0x200000, 16 << 20, 64 << 20, 256 << 20, 1 << 31, 1 << 32,
         (1 << 64) - 1, 0xFFF]  # fmt: skip
NAMES = ["frontend", "service", "dom0", "a", "x@1", "chosen", "a b", "../../../esc", "",
         "memory", "d\u00e9", "evtchn-10", "module@50000000", "dom1"]  # fmt: skip
guard = Guard(timeout=5.0)
_files = guard.jail / "inputs"  # kernels and ramdisks: fixtures beside out/
_files.mkdir()
guard.jail_extra = {"inputs"}
FILE_SIZES = [0, 1, 4096, 0x200000, 0x200001, 7 << 20, 1 << 30, 1 << 33]
for _i, _n in enumerate(FILE_SIZES):
    with open(_files / f"blob{_i}", "wb") as _f:
        _f.truncate(_n)  # sparse


def _cells(values: list[int], n: int) -> bytes:
    return b"".join((v % (1 << (32 * n))).to_bytes(4 * n, "big") for v in values) if n else b""


def rare(fdp: atheris.FuzzedDataProvider, good: object, odd: list) -> Any:
    """Mostly the value a working system has; one time in eight a boundary value."""
    return fdp.PickValueInList(odd) if fdp.ConsumeIntInRange(0, 7) == 0 else good


def base_dtb(fdp: atheris.FuzzedDataProvider) -> bytes:
    fdt = Fdt()
    ac, sc = rare(fdp, 2, [1, 0, 3]), rare(fdp, 2, [1, 0, 3])
    if rare(fdp, True, [False]):
        fdt.root.set(Property.from_u32("#address-cells", ac))
        fdt.root.set(Property.from_u32("#size-cells", sc))
    else:
        ac, sc = 2, 1  # the defaults a reader assumes
    for i in range(rare(fdp, 1, [0, 2, 3])):
        base = rare(fdp, RAM0, ADDRS)
        name = rare(fdp, f"memory@{base:x}", ["memory", f"memory@{i}", "mem"])
        if fdt.root.child(name) is not None:
            continue
        node = fdt.root.add_child(Node(name))
        node.set(Property("device_type", rare(fdp, b"memory\0", [b"mem\0", b"memory", b""])))
        banks = [(base, rare(fdp, 2 << 30, SIZES))]
        banks += [(fdp.PickValueInList(ADDRS), fdp.PickValueInList(SIZES))
                  for _ in range(rare(fdp, 0, [1, 2]))]  # fmt: skip
        raw = b"".join(_cells([a], ac) + _cells([s], sc) for a, s in banks)
        if rare(fdp, False, [True]):
            raw = raw[: fdp.ConsumeIntInRange(0, len(raw))]
        if rare(fdp, True, [False]):
            node.set(Property("reg", raw))
    chosen = fdt.root.add_child(Node("chosen"))
    chosen.set(Property.from_string("bootargs", "console=ttyAMA0"))
    if rare(fdp, False, [True]):
        chosen.add_child(Node(fdp.PickValueInList(["frontend", "service", "dom"])))
    if rare(fdp, False, [True, True]):  # firmware's own reserved memory
        rm = fdt.root.add_child(Node("reserved-memory"))
        rm.set(Property.from_u32("#address-cells", 2))
        rm.set(Property.from_u32("#size-cells", 2))
        rm.set(Property.empty("ranges"))
        a, s = fdp.PickValueInList(ADDRS), fdp.PickValueInList(SIZES)
        fw = rm.add_child(Node(f"firmware@{a:x}"))
        fw.set(Property("reg", _cells([a], 2) + _cells([s], 2)))
        fw.set(Property.empty("no-map"))
    blob = bytearray(fdt.to_bytes())
    for _ in range(rare(fdp, 0, [1, 2, 3])):  # mostly intact: the loader is the target
        blob[fdp.ConsumeIntInRange(0, len(blob) - 1)] = fdp.ConsumeIntInRange(0, 255)
    return bytes(blob)


def _file(fdp: atheris.FuzzedDataProvider) -> Path:
    return _files / f"blob{rare(fdp, fdp.ConsumeIntInRange(2, 5), list(range(len(FILE_SIZES))))}"


def layout_system(fdp: atheris.FuzzedDataProvider) -> xen.XenSystem:
    """The shipped two-domain system from a layout with some fields at boundary values."""
    fields = {}
    for name in ("carveout_host", "msg_host", "msg_guest", "carveout_guest"):
        if rare(fdp, False, [True]):
            fields[name] = fdp.PickValueInList(ADDRS)
    for name in ("carveout_size", "msg_size", "frontend_mem", "service_mem"):
        if rare(fdp, False, [True]):
            fields[name] = fdp.PickValueInList(SIZES)
    for name in ("frontend_port", "service_port"):
        if rare(fdp, False, [True]):
            fields[name] = fdp.PickValueInList([0, 1, 10, 11, 4095, 4096, 1 << 32])
    if rare(fdp, False, [True]):
        fields["header_timeout_ms"] = fdp.PickValueInList([0, 1 << 32, -1])
    return xs.xen_system(xs.XenLayout(**fields), kernel=_file(fdp), frontend_initrd=_file(fdp),
                         service_initrd=_file(fdp))  # fmt: skip


def free_system(fdp: atheris.FuzzedDataProvider) -> xen.XenSystem:
    names = [rare(fdp, f"dom{i}", NAMES) for i in range(rare(fdp, 2, [0, 1, 3, 4]))]
    regions = []
    for i in range(fdp.ConsumeIntInRange(0, 4)):
        rname = rare(fdp, f"r{i}", ["msg", "carveout", "r0", "bad name", "", "../x"])
        host = rare(fdp, 0xA0000000 + i * (64 << 20) + fdp.ConsumeIntInRange(0, 3) * PAGE, ADDRS)
        size = rare(fdp, fdp.PickValueInList([PAGE, 64 << 10, 16 << 20]), SIZES)
        guest = rare(fdp, 0x3A000000 + i * (16 << 20), ADDRS)
        doms = tuple(n for n in names if fdp.ConsumeBool()) + rare(fdp, (), [("ghost",)])
        regions.append(xen.XenRegion(rname, host, size, guest, doms))
    domains = []
    for n in names:
        pts = []
        for j in range(fdp.ConsumeIntInRange(0, 2)):
            picked = tuple(r.name for r in regions if n in r.domains and fdp.ConsumeBool())
            picked += rare(fdp, (), [("ghost",), ("r0",)])
            props = (Property.from_string("compatible", "edgevirt,virtio-msg"),) if j else ()
            pts.append(xen.PassthroughNode(rare(fdp, f"bus@{j}", ["n", "a b", "", "x/y"]),
                                           picked, props))  # fmt: skip
        memory = rare(fdp, fdp.PickValueInList([64 << 20, 256 << 20]), [0, 1000, 1 << 40, -1])
        args = rare(fdp, "console=hvc0", ["", "x\u00e9", "a\0b"])
        ramdisk = _file(fdp) if fdp.ConsumeBool() else None
        cpus = rare(fdp, 1, [2, 8, 0, 9])
        domains.append(xen.XenDomain(n, memory, _file(fdp), args, ramdisk, cpus, pts))
    evtchns = []
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        ends = []
        for _ in range(2):
            dom = names[fdp.ConsumeIntInRange(0, len(names) - 1)] if names else "g"
            ends.append((rare(fdp, dom, ["ghost"]),
                         rare(fdp, fdp.ConsumeIntInRange(1, 20), [0, 4095, 4096, -1])))  # fmt: skip
        evtchns.append(xen.XenEvtchn(ends[0], ends[1]))
    bootargs = rare(fdp, "console=dtuart", ["", "a\u00e9", "x" * 300, "a\0b"])
    base = rare(fdp, xen.DEFAULT_MODULE_BASE, [RAM0, 0x7FE00000, 0xBFE00000, 0, 0x41000000])
    return xen.XenSystem(domains, regions, evtchns, bootargs, base)


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


def check(blob: bytes, system: xen.XenSystem, out: Path) -> None:
    xdt = xen.compose_xen(Fdt.from_bytes(blob), system, out / "dt")
    host = Fdt.from_bytes(xdt.host_dtb.read_bytes())
    ram = xdt.ram
    assert xen.host_ram(host) == ram, (xen.host_ram(host), ram)
    assert host.get("/chosen").prop("xen,xen-bootargs").as_string() == system.bootargs
    inside = lambda a, s: ram[0] <= a and a + s <= ram[0] + ram[1]  # noqa: E731
    modules = [(ld.addr, ld.size) for ld in xdt.loads if ld.size]
    for i, m in enumerate(modules):
        assert inside(*m), f"module {m} outside RAM {ram}"
        assert not _overlap(m, xen.XEN_LOAD), f"module {m} overlaps Xen {xen.XEN_LOAD}"
        for other in modules[:i]:
            assert not _overlap(m, other), f"modules {m} and {other} overlap"
    for _path, node in host.walk():
        if node.name != "chosen":
            continue
        for dom in node.children.values():
            for mod in dom.children.values():
                if mod.basename == "module":
                    got = tuple(mod.prop("reg").as_u32_list())
                    assert got in [(ld.addr, ld.size) for ld in xdt.loads], got
    nomap: list[tuple[tuple[int, int], bool]] = []
    ours = {f"{r.name}@{r.host:x}" for r in system.regions}
    rm = host.find("/reserved-memory")
    if rm is not None:
        ac, sc = host.cells("/reserved-memory")
        for child in rm.children.values():
            if child.get("no-map") is not None:
                for r in child.prop("reg").as_cells(ac, sc):
                    # the base's own (firmware) may sit in another bank; ours must be in RAM
                    assert child.name not in ours or inside(*r), f"{r} outside RAM {ram}"
                    nomap.append((r, child.name in ours))
    assert sum(mine for _, mine in nomap) == len(system.regions)
    for i, (r, mine) in enumerate(nomap):
        assert not _overlap(r, xen.XEN_LOAD), f"no-map region {r} overlaps Xen"
        for m in modules:
            assert not _overlap(r, m), f"no-map region {r} overlaps module {m}"
        for other, theirs in nomap[:i]:  # two of the base's own may overlap: not ours to judge
            assert not (mine or theirs) or not _overlap(r, other), f"{r} and {other} overlap"
    regions = {r.name: r for r in system.regions}
    for d in system.domains:
        part = Fdt.from_bytes(xdt.partials[d.name].read_bytes())
        pt = part.get("/passthrough")
        assert [n.name for n in pt.children.values()] == [p.name for p in d.passthrough]
        for pn in d.passthrough:
            node = pt.children[pn.name]
            rs = [regions[n] for n in pn.regions]
            assert all(d.name in r.domains for r in rs), (d.name, pn.regions)
            want = [c for r in rs for c in (r.host >> 32, r.host & 0xFFFFFFFF, r.size >> 32,
                                            r.size & 0xFFFFFFFF, r.guest >> 32,
                                            r.guest & 0xFFFFFFFF)]  # fmt: skip
            assert node.prop("xen,reg").as_u32_list() == want, f"{pn.name}: xen,reg != {want}"
            assert node.prop("reg").as_cells(2, 2) == [(r.guest, r.size) for r in rs]


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    blob = base_dtb(fdp)
    make = layout_system if fdp.ConsumeIntInRange(0, 2) == 0 else free_system
    guard.run(lambda out: check(blob, make(fdp), out))  # building the system may refuse too


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
