"""Host device tree for Xen dom0less, and each domain's partial device tree.

From the board's base DTB (QEMU ``virt`` dumped with ``virtualization=on``, or a real
board's DTB) and a :class:`XenSystem` this module writes what Xen 4.17 reads at boot
(docs/misc/arm/device-tree/booting.txt and passthrough.txt in Xen's tree):

* ``/chosen``: ``xen,xen-bootargs`` and one ``compatible = "xen,domain"`` node per domU with
  ``memory`` (KiB), ``cpus``, ``vpl011``, its modules (``multiboot,kernel`` /
  ``multiboot,ramdisk`` / ``multiboot,device-tree`` at addresses from the load plan) and its
  static event channels (``xen,evtchn-v1``: local port + phandle of the peer's node);
* ``/reserved-memory``: one ``no-map`` node per shared region, so Xen gives that memory to
  no domain's RAM;
* per domain, a **partial DTB** whose ``/passthrough`` children carry ``xen,reg`` (host
  address, size, guest address): Xen maps those host pages into the domain, which is how a
  shared region reaches exactly the domains that list it and no other.

A dom0less domU's tree is built by Xen: from the partial DTB it takes only ``/passthrough``
children and ``/aliases`` (DESIGN §8), so the nodes edgevirt's guests read live there.

Everything is validated before a blob is written, with addresses in every message: regions
inside host RAM, page-aligned, not overlapping Xen, the modules, each other, the DTB or
memory the base tree reserves already (a real board's firmware); names that become node
names are valid node names;
guest addresses outside the domain's RAM; domains that fit into the host's RAM.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edgevirt.devicetree.fdt import Fdt, Node, Property, check_name
from edgevirt.errors import DeviceTreeError

PAGE = 0x1000
MODULE_ALIGN = 0x200000
#: Xen 4.17's guest memory map (xen/include/public/arch-arm.h): RAM bank 0 at 1 GiB. The
#: grant table (0x38000000) and magic pages (0x39000000, 16 MiB) sit below it; the window
#: between them and RAM is free for passthrough regions.
GUEST_RAM0_BASE = 0x40000000
GUEST_FREE_WINDOW = (0x3A000000, 0x40000000)
#: QEMU puts a ``-dtb`` at RAM + min(RAM/2, 128 MiB) when there is no initrd; modules start
#: well above it, and Xen (loaded at RAM + 2 MiB by ``-kernel``) relocates itself to the top.
DEFAULT_MODULE_BASE = 0x50000000
XEN_LOAD = (0x40000000, 0x2000000)  # where QEMU/U-Boot put Xen and the DTB: never a module


@dataclass(frozen=True)
class XenRegion:
    """Host-reserved memory that Xen maps into ``domains`` at guest address ``guest``."""

    name: str
    host: int
    size: int
    guest: int
    domains: tuple[str, ...]


@dataclass(frozen=True)
class PassthroughNode:
    """A ``/passthrough`` child of a domain's partial DTB: ``reg`` = the named regions at
    their guest addresses (mapped by Xen through ``xen,reg``), plus ``properties``."""

    name: str
    regions: tuple[str, ...]
    properties: tuple[Property, ...] = ()


@dataclass
class XenDomain:
    name: str
    memory: int  # bytes
    kernel: Path
    bootargs: str
    ramdisk: Path | None = None
    cpus: int = 1
    passthrough: list[PassthroughNode] = field(default_factory=list)


@dataclass(frozen=True)
class XenEvtchn:
    """A static interdomain event channel: ``(domain, port)`` at each end."""

    a: tuple[str, int]
    b: tuple[str, int]


@dataclass
class XenSystem:
    domains: list[XenDomain]
    regions: list[XenRegion] = field(default_factory=list)
    evtchns: list[XenEvtchn] = field(default_factory=list)
    bootargs: str = "console=dtuart dtuart=/pl011@9000000 xsm=dummy guest_loglvl=all"
    module_base: int = DEFAULT_MODULE_BASE


@dataclass(frozen=True)
class Load:
    """A blob to place at ``addr`` in host memory (QEMU ``loader`` device or U-Boot load)."""

    path: Path
    addr: int
    size: int
    what: str


@dataclass
class XenDt:
    host_dtb: Path
    partials: dict[str, Path]
    loads: list[Load]
    ram: tuple[int, int]
    #: Rows for a memory map: host side and each domain's view.
    host_map: list[dict] = field(default_factory=list)
    domain_maps: dict[str, list[dict]] = field(default_factory=dict)


def _span(base: int, size: int) -> str:
    return f"[{base:#x}, {base + size:#x})"


def host_ram(fdt: Fdt) -> tuple[int, int]:
    """The first ``/memory`` bank of the base tree (QEMU virt has one)."""
    ac, sc = fdt.cells("/")
    for _path, node in fdt.walk():
        dtype = node.get("device_type")
        if node.basename == "memory" and dtype is not None and dtype.as_string() == "memory":
            banks = node.prop("reg").as_cells(ac, sc)
            if banks:
                return banks[0]
    raise DeviceTreeError('base DTB: no /memory node with device_type = "memory"')


def base_reserved(fdt: Fdt) -> list[tuple[str, int, int]]:
    """Memory the base tree already reserves (firmware, a secure OS, CMA pools): its
    ``/memreserve/`` entries and every ``/reserved-memory`` child with a ``reg``. Neither a
    module nor a shared region may land there."""
    out = [(f"/memreserve/ entry {i}", a, s) for i, (a, s) in enumerate(fdt.memreserve) if s]
    rm = fdt.find("/reserved-memory")
    if rm is not None:
        ac, sc = fdt.cells("/reserved-memory")
        for child in rm.children.values():
            reg = child.get("reg")
            if reg is not None:
                out += [(f"/reserved-memory/{child.name}", a, sz)
                        for a, sz in reg.as_cells(ac, sc) if sz]  # fmt: skip
    return out


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


def validate(
    system: XenSystem,
    ram: tuple[int, int],
    loads: Sequence[Load],
    occupied: Sequence[tuple[str, int, int]] = (),
) -> None:
    """Every rule a Xen host tree must satisfy, before anything is written or started.
    ``occupied``: (what, base, size) the base tree reserves already (:func:`base_reserved`)."""
    names = [d.name for d in system.domains]
    if len(set(names)) != len(names) or not names:
        raise DeviceTreeError(f"xen: domain names must be unique and non-empty: {names}")
    ram_end = ram[0] + ram[1]
    taken: list[tuple[str, int, int]] = [("Xen image and DTB", *XEN_LOAD), *occupied]
    for what, base, size in occupied:
        if _overlap((base, size), XEN_LOAD):
            raise DeviceTreeError(
                f"xen: the base tree reserves {_span(base, size)} ({what}), where Xen and its "
                f"DTB are loaded {_span(*XEN_LOAD)}"
            )
    for ld in loads:
        where = f"xen: module {ld.what} ({ld.path.name}, {ld.size:#x} bytes) at "
        if ld.addr < ram[0] or ld.addr + ld.size > ram_end:
            raise DeviceTreeError(f"{where}{_span(ld.addr, ld.size)} does not fit host RAM "
                                  f"{_span(*ram)}")  # fmt: skip
        for what, base, size in taken:
            if _overlap((ld.addr, ld.size), (base, size)):
                raise DeviceTreeError(f"{where}{_span(ld.addr, ld.size)} overlaps {what} "
                                      f"{_span(base, size)}")  # fmt: skip
        taken.append((f"module {ld.what} ({ld.path.name})", ld.addr, ld.size))
    reserved = 0
    for r in system.regions:
        where = f"xen: region {r.name} {_span(r.host, r.size)}"
        if r.size <= 0 or r.host % PAGE or r.size % PAGE or r.guest % PAGE:
            raise DeviceTreeError(
                f"{where} guest {r.guest:#x}: base, size and guest address must be "
                f"multiples of the {PAGE:#x}-byte page"
            )
        if r.host < ram[0] or r.host + r.size > ram_end:
            raise DeviceTreeError(f"{where} lies outside host RAM {_span(*ram)}")
        for what, base, size in taken:
            if _overlap((r.host, r.size), (base, size)):
                raise DeviceTreeError(f"{where} overlaps {what} {_span(base, size)}")
        lo, hi = GUEST_FREE_WINDOW
        if not (lo <= r.guest and r.guest + r.size <= hi):
            raise DeviceTreeError(
                f"{where}: guest address {_span(r.guest, r.size)} is outside the free "
                f"window {_span(lo, hi - lo)} of Xen 4.17's guest memory map"
            )
        for dn in r.domains:
            if dn not in names:
                raise DeviceTreeError(f"{where}: unknown domain {dn!r} (domains: {names})")
        taken.append((f"region {r.name}", r.host, r.size))
        reserved += r.size
    seen_guest: dict[str, list[XenRegion]] = {}
    for r in system.regions:
        for dn in r.domains:
            for other in seen_guest.setdefault(dn, []):
                if _overlap((r.guest, r.size), (other.guest, other.size)):
                    raise DeviceTreeError(
                        f"xen: domain {dn}: region {r.name} at guest {_span(r.guest, r.size)} "
                        f"overlaps region {other.name} at {_span(other.guest, other.size)}"
                    )
            seen_guest[dn].append(r)
    regions = {r.name: r for r in system.regions}
    for d in system.domains:
        if d.memory <= 0 or d.memory % (1 << 20):
            raise DeviceTreeError(f"xen: domain {d.name}: memory {d.memory:#x} is not whole MiB")
        if not 1 <= d.cpus <= 8:
            raise DeviceTreeError(f"xen: domain {d.name}: cpus {d.cpus} outside 1..8")
        for pn in d.passthrough:
            for rn in pn.regions:
                if rn not in regions or d.name not in regions[rn].domains:
                    raise DeviceTreeError(
                        f"xen: domain {d.name}: passthrough node {pn.name} names region "
                        f"{rn!r}, which is not mapped into {d.name}"
                    )
    # Xen itself, its heap and the modules need room too; the domains' RAM must fit beside.
    need = sum(d.memory for d in system.domains)
    room = ram[1] - reserved - XEN_LOAD[1] - sum(ld.size for ld in loads)
    if need > room:
        raise DeviceTreeError(
            f"xen: domains need {need >> 20} MiB of RAM "
            f"({', '.join(f'{d.name} {d.memory >> 20} MiB' for d in system.domains)}); host "
            f"RAM {_span(*ram)} has {room >> 20} MiB left after the regions and modules"
        )
    ports: set[tuple[str, int]] = set()
    for ev in system.evtchns:
        for dom, port in (ev.a, ev.b):
            if dom not in names:
                raise DeviceTreeError(f"xen: event channel end {dom}:{port}: unknown domain")
            if not 1 <= port < 4096 or (dom, port) in ports:
                raise DeviceTreeError(
                    f"xen: event channel port {dom}:{port} is taken or outside 1..4095"
                )
            ports.add((dom, port))


def partial_dt(domain: XenDomain, regions: dict[str, XenRegion]) -> Fdt:
    """The domain's partial DTB: ``/passthrough`` with one child per node."""
    fdt = Fdt()
    root = fdt.root
    root.set(Property.from_u32("#address-cells", 2))
    root.set(Property.from_u32("#size-cells", 2))
    pt = root.add_child(Node("passthrough"))
    pt.set(Property.from_string("compatible", "simple-bus"))
    pt.set(Property.empty("ranges"))
    pt.set(Property.from_u32("#address-cells", 2))
    pt.set(Property.from_u32("#size-cells", 2))
    for pn in domain.passthrough:
        for n in pn.regions:
            if n not in regions:
                raise DeviceTreeError(
                    f"xen: domain {domain.name}: passthrough node {pn.name} names region "
                    f"{n!r}; regions: {sorted(regions)}"
                )
        rs = [regions[n] for n in pn.regions]
        node = pt.add_child(Node(pn.name))
        for p in pn.properties:
            node.set(p)
        node.set(Property.from_cells("reg", [(r.guest, r.size) for r in rs], 2, 2))
        xen_reg: list[int] = []
        for r in rs:
            xen_reg += [r.host >> 32, r.host & 0xFFFFFFFF, r.size >> 32, r.size & 0xFFFFFFFF,
                        r.guest >> 32, r.guest & 0xFFFFFFFF]  # fmt: skip
        node.set(Property.from_u32("xen,reg", *xen_reg))
        node.set(Property.empty("xen,force-assign-without-iommu"))
    return fdt


def _module(parent: Node, kinds: Iterable[str], ld: Load, bootargs: str | None = None) -> None:
    node = parent.add_child(Node(f"module@{ld.addr:x}"))
    node.set(Property.from_strings("compatible", [*kinds, "multiboot,module"]))
    node.set(Property.from_u32("reg", ld.addr, ld.size))
    if bootargs is not None:
        node.set(Property.from_string("bootargs", bootargs))


def compose_xen(base: Fdt, system: XenSystem, out_dir: Path) -> XenDt:
    """Write every domain's partial DTB and the host DTB into ``out_dir``; return the load
    plan. Raises :class:`DeviceTreeError` before writing anything the plan breaks."""
    ram = host_ram(base)
    regions = {r.name: r for r in system.regions}
    if len(regions) != len(system.regions):
        raise DeviceTreeError(f"xen: region names repeat: {[r.name for r in system.regions]}")
    # Names become node names (and a domain's, a file name): checked before anything is written.
    for what, name in [("domain", d.name) for d in system.domains] + [
        ("region", r.name) for r in system.regions
    ]:
        check_name(name, f"xen: {what} name")
    partials = {d.name: partial_dt(d, regions) for d in system.domains}
    out_dir.mkdir(parents=True, exist_ok=True)
    blobs = {d.name: partials[d.name].to_bytes() for d in system.domains}
    # Load plan: kernel, ramdisk, partial DTB of each domain, one after another.
    loads: list[Load] = []
    addr = system.module_base
    partial_paths: dict[str, Path] = {}
    for d in system.domains:
        partial_paths[d.name] = out_dir / f"{d.name}.dtb"
        for what, path, size in (
            ("kernel", d.kernel, d.kernel.stat().st_size),
            ("ramdisk", d.ramdisk, d.ramdisk.stat().st_size if d.ramdisk else 0),
            ("device-tree", partial_paths[d.name], len(blobs[d.name])),
        ):
            if path is None:
                continue
            loads.append(Load(path, addr, size, f"{d.name} {what}"))
            addr = (addr + size + MODULE_ALIGN - 1) // MODULE_ALIGN * MODULE_ALIGN
    validate(system, ram, loads, base_reserved(base))
    for name, blob in blobs.items():
        partial_paths[name].write_bytes(blob)

    host = base.copy()
    chosen = host.find("/chosen") or host.root.add_child(Node("chosen"))
    chosen.set(Property.from_u32("#address-cells", 1))
    chosen.set(Property.from_u32("#size-cells", 1))
    chosen.set(Property.from_string("xen,xen-bootargs", system.bootargs))
    for key in ("bootargs", "linux,initrd-start", "linux,initrd-end"):
        chosen.properties.pop(key, None)
    by_dom: dict[str, list[Load]] = {}
    for ld in loads:
        by_dom.setdefault(ld.what.split(" ")[0], []).append(ld)
    dom_nodes: dict[str, Node] = {}
    for d in system.domains:
        node = chosen.add_child(Node(d.name))
        dom_nodes[d.name] = node
        node.set(Property.from_string("compatible", "xen,domain"))
        node.set(Property.from_u32("#address-cells", 1))
        node.set(Property.from_u32("#size-cells", 1))
        node.set(Property.from_u64("memory", d.memory >> 10))
        node.set(Property.from_u32("cpus", d.cpus))
        node.set(Property.empty("vpl011"))
        # The /hypervisor node (event channels, grant table) without xenstore: there is
        # no dom0 to run one. Static event channels need it (Xen 4.17 booting.txt).
        node.set(Property.from_string("xen,enhanced", "no-xenstore"))
        for ld in by_dom[d.name]:
            kind = ld.what.split(" ")[1]
            if kind == "kernel":
                _module(node, ["multiboot,kernel"], ld, d.bootargs)
            else:
                _module(node, [f"multiboot,{kind}"], ld)
    # Static event channels: each end names the other's node by phandle.
    for ev in system.evtchns:
        ends = []
        for dom, port in (ev.a, ev.b):
            node = dom_nodes[dom].add_child(Node(f"evtchn-{port}"))
            node.set(Property.from_string("compatible", "xen,evtchn-v1"))
            ends.append((node, port, host.assign_phandle(node)))
        (na, pa, ha), (nb, pb, hb) = ends
        na.set(Property.from_u32("xen,evtchn", pa, hb))
        nb.set(Property.from_u32("xen,evtchn", pb, ha))
    if system.regions:
        rm = host.find("/reserved-memory") or host.root.add_child(Node("reserved-memory"))
        rm.set(Property.from_u32("#address-cells", 2))
        rm.set(Property.from_u32("#size-cells", 2))
        rm.set(Property.empty("ranges"))
        for r in system.regions:
            n = rm.add_child(Node(f"{r.name}@{r.host:x}"))
            n.set(Property.from_cells("reg", [(r.host, r.size)], 2, 2))
            n.set(Property.empty("no-map"))
    host_path = out_dir / "host.dtb"
    host.write(host_path)
    xdt = XenDt(host_path, partial_paths, loads, ram)
    xdt.host_map = [
        {"what": "host RAM", "base": ram[0], "size": ram[1]},
        {"what": "Xen + host DTB (load)", "base": XEN_LOAD[0], "size": XEN_LOAD[1]},
    ]
    xdt.host_map += [{"what": f"module: {ld.what}", "base": ld.addr, "size": ld.size}
                     for ld in loads]  # fmt: skip
    xdt.host_map += [{"what": f"reserved no-map: {r.name} → {', '.join(r.domains)}",
                      "base": r.host, "size": r.size} for r in system.regions]  # fmt: skip
    xdt.host_map.sort(key=lambda row: (row["base"], -row["size"]))
    for d in system.domains:
        rows = [{"what": "RAM (allocated by Xen)", "base": GUEST_RAM0_BASE, "size": d.memory}]
        rows += [{"what": f"passthrough {r.name} (host {r.host:#x})", "base": r.guest,
                  "size": r.size} for r in system.regions if d.name in r.domains]  # fmt: skip
        xdt.domain_maps[d.name] = sorted(rows, key=lambda row: row["base"])
    return xdt
