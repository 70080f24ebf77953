"""Device-tree model, overlays and the carve-out composer, checked against dtc/fdtoverlay.

Real QEMU ``virt`` DTBs are dumped at test time (plain, and with two NUMA nodes as the
carve-out topology of DESIGN §3 uses). dtc's own view (``dtc -I dtb -O dts``) is the oracle
for trees, ``fdtoverlay`` (libfdt) for overlay application, pyfdt for a second parse.
"""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgevirt.deploy.qemucmd import qemu_base
from edgevirt.devicetree import (
    Fdt,
    Node,
    Overlay,
    Property,
    Ref,
    apply_overlay,
    compose_carveout,
    memory_ranges,
    reserved_ranges,
    virtio_mmio_nodes,
    write_outputs,
)
from edgevirt.errors import DeviceTreeError

TOOLS = ("qemu-system-aarch64", "dtc", "fdtoverlay")
needs_tools = pytest.mark.skipif(
    any(shutil.which(t) is None for t in TOOLS), reason="needs qemu-system-aarch64, dtc, fdtoverlay"
)
NUMA_ARGS = [
    "-object",
    "memory-backend-ram,id=m0,size=448M",
    "-object",
    "memory-backend-ram,id=m1,size=64M",
    "-numa",
    "node,nodeid=0,memdev=m0",
    "-numa",
    "node,nodeid=1,memdev=m1",
]
NODE1 = (0x5C000000, 0x4000000)  # where QEMU puts NUMA node 1 for 448M + 64M
LAST_VIRTIO = "/virtio_mmio@a003e00"  # the slot QEMU fills first


def run(*cmd: str | Path, stdin: bytes | None = None) -> bytes:
    return subprocess.run(
        [str(c) for c in cmd], input=stdin, capture_output=True, check=True
    ).stdout


def dtc_view(blob: bytes | Path, tmp: Path) -> str:
    """dtc's DTS rendering of a blob: the oracle for tree equality."""
    if isinstance(blob, bytes):
        path = tmp / f"view{len(list(tmp.iterdir()))}.dtb"
        path.write_bytes(blob)
        blob = path
    return run("dtc", "-q", "-I", "dtb", "-O", "dts", blob).decode()


def dtc_compile(dts: str, tmp: Path, *flags: str) -> bytes:
    src = tmp / f"src{len(list(tmp.iterdir()))}.dts"
    src.write_text(dts)
    return run("dtc", "-q", *flags, "-I", "dts", "-O", "dtb", src)


def fdtoverlay(base: bytes, overlays: list[bytes], tmp: Path) -> bytes:
    paths = []
    for i, blob in enumerate([base, *overlays]):
        paths.append(tmp / f"fo{i}.dtb")
        paths[-1].write_bytes(blob)
    run("fdtoverlay", "-i", paths[0], "-o", tmp / "fo-out.dtb", *paths[1:])
    return (tmp / "fo-out.dtb").read_bytes()


@pytest.fixture(scope="module")
def qemu_dtbs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    if any(shutil.which(t) is None for t in TOOLS):
        pytest.skip("needs qemu-system-aarch64, dtc, fdtoverlay")
    tmp = tmp_path_factory.mktemp("qemu")
    out = {}
    for kind, extra in (("plain", []), ("numa", NUMA_ARGS)):
        path = tmp / f"{kind}.dtb"
        run(*qemu_base(f"virt,dumpdtb={path}", cpu="cortex-a57", memory="512M", extra=extra))
        out[kind] = path.read_bytes()
    return out


@pytest.fixture(params=["plain", "numa"])
def qemu_raw(request: pytest.FixtureRequest, qemu_dtbs: dict[str, bytes]) -> bytes:
    return qemu_dtbs[request.param]


@pytest.fixture
def numa(qemu_dtbs: dict[str, bytes]) -> Fdt:
    return Fdt.from_bytes(qemu_dtbs["numa"])


@pytest.fixture
def plain(qemu_dtbs: dict[str, bytes]) -> Fdt:
    return Fdt.from_bytes(qemu_dtbs["plain"])


def totalsize(blob: bytes) -> int:
    return int(struct.unpack_from(">I", blob, 4)[0])


# -- the FDT model on real QEMU blobs ---------------------------------------------------


@needs_tools
def test_roundtrip_matches_dtc_and_is_compact(qemu_raw: bytes, tmp_path: Path) -> None:
    assert totalsize(qemu_raw) == len(qemu_raw) == 1 << 20  # QEMU pads dumpdtb output
    ours = Fdt.from_bytes(qemu_raw).to_bytes()
    assert totalsize(ours) == len(ours) < 16384
    assert dtc_view(ours, tmp_path) == dtc_view(qemu_raw, tmp_path)
    # dtc -I dtb -O dtb writes the same layout (header, rsvmap, struct, shared strings)
    assert ours == dtc_compile_dtb(qemu_raw, tmp_path)
    assert Fdt.from_bytes(ours).same_as(Fdt.from_bytes(qemu_raw))


def dtc_compile_dtb(blob: bytes, tmp: Path) -> bytes:
    (tmp / "in.dtb").write_bytes(blob)
    return run("dtc", "-q", "-I", "dtb", "-O", "dtb", tmp / "in.dtb")


@needs_tools
def test_to_dts_compiles_to_the_same_tree(qemu_raw: bytes, tmp_path: Path) -> None:
    fdt = Fdt.from_bytes(qemu_raw)
    fdt.memreserve.append((0x48000000, 0x10000))
    compiled = dtc_compile(fdt.to_dts(), tmp_path)
    assert dtc_view(compiled, tmp_path) == dtc_view(fdt.to_bytes(), tmp_path)
    assert "/memreserve/ 0x48000000 0x10000;" in fdt.to_dts()
    assert 'compatible = "virtio,mmio";' in fdt.to_dts()


def _pyfdt_raw(prop: object) -> bytes:
    from pyfdt import pyfdt

    if isinstance(prop, pyfdt.FdtPropertyStrings):
        return b"".join(s.encode() + b"\0" for s in prop.strings)
    if isinstance(prop, pyfdt.FdtPropertyWords):
        return b"".join(struct.pack(">I", w) for w in prop.words)
    if isinstance(prop, pyfdt.FdtPropertyBytes):
        return bytes(b & 0xFF for b in prop.bytes)
    return b""


@needs_tools
def test_pyfdt_sees_the_same_tree(qemu_raw: bytes) -> None:
    from pyfdt import pyfdt

    theirs = pyfdt.FdtBlobParse(io.BytesIO(qemu_raw)).to_fdt()
    ours = Fdt.from_bytes(qemu_raw)

    def compare(pnode: object, node: Node) -> None:
        items = [i for i in pnode if not isinstance(i, pyfdt.FdtNop)]  # type: ignore[attr-defined]
        props = [(i.get_name(), _pyfdt_raw(i)) for i in items if isinstance(i, pyfdt.FdtProperty)]
        assert props == [(p.name, p.value) for p in node.properties.values()]
        kids = [i for i in items if isinstance(i, pyfdt.FdtNode)]
        assert [k.get_name() for k in kids] == list(node.children)
        for kid in kids:
            compare(kid, node.children[kid.get_name()])

    compare(theirs.get_rootnode(), ours.root)
    # pyfdt's writer is sound for this blob too: dtc sees the same tree
    assert Fdt.from_bytes(theirs.to_dtb()).same_as(ours)


@needs_tools
def test_lookup_and_typed_properties(numa: Fdt) -> None:
    node = numa.get(LAST_VIRTIO)
    assert node.prop("compatible").as_string() == "virtio,mmio"
    assert node.prop("reg").as_cells(*numa.cells("/")) == [(0xA003E00, 0x200)]
    assert node.prop("interrupts").as_u32_list() == [0, 16 + 31, 1]
    assert numa.find("/memory") is numa.get("/memory@5c000000")  # libfdt: first name@ match
    assert numa.find("/nope") is None
    with pytest.raises(DeviceTreeError, match="'/nope'"):
        numa.get("/nope")
    assert sorted(memory_ranges(numa)) == [(0x40000000, 0x1C000000), NODE1]
    assert numa.get("/psci").prop("compatible").as_strings()[-1] == "arm,psci"
    virtio = virtio_mmio_nodes(numa)
    assert len(virtio) == 32 and virtio[-1].path == LAST_VIRTIO
    assert {v.address for v in virtio} == {0xA000000 + 0x200 * i for i in range(32)}
    assert reserved_ranges(numa) == []


@needs_tools
def test_phandle_allocation_is_max_plus_one(plain: Fdt) -> None:
    highest = plain.max_phandle()
    assert highest >= 0x8000  # QEMU numbers its phandles from 0x8000
    assert plain.allocate_phandle() == highest + 1
    node = plain.get(LAST_VIRTIO)
    assert plain.assign_phandle(node) == highest + 1
    assert plain.assign_phandle(node) == highest + 1
    assert plain.by_phandle(highest + 1) is node
    assert plain.allocate_phandle() == highest + 2


def test_property_helpers() -> None:
    assert Property.from_u32("x", 1, 0xFFFFFFFF).as_u32_list() == [1, 0xFFFFFFFF]
    assert Property.from_u64("x", 1 << 40).as_u64() == 1 << 40
    assert Property.from_u64("x", 1, 2).as_u64_list() == [1, 2]
    assert Property.from_strings("x", ["a", "b"]).value == b"a\0b\0"
    assert Property.from_string("x", "abc").as_string() == "abc"
    reg = Property.from_cells("reg", [(0x1_0000_0000, 0x1000), (5, 6)], 2, 1)
    assert reg.value.hex() == "000000010000000000001000000000000000000500000006"
    assert reg.as_cells(2, 1) == [(0x1_0000_0000, 0x1000), (5, 6)]
    assert Property.from_u32("p", Ref("lbl"), 7).refs == ((0, "lbl"),)
    for bad in (
        lambda: Property.from_u32("x", 1 << 32),
        lambda: Property.from_cells("reg", [(1 << 32, 1)], 1, 1),
        lambda: Property("x", b"\0\0\0").as_u32(),
        lambda: Property("x", b"ab").as_string(),
        lambda: Property("x", b"a\0b\0").as_string(),
        lambda: Property("x", b"\0" * 12).as_cells(2, 2),
        lambda: Property.from_string("x", "a\0b"),
        lambda: Node("bad name"),
        lambda: Node("x").add_child(Node("a/b")),
    ):
        with pytest.raises(DeviceTreeError):
            bad()


def test_memreserve_and_boot_cpu_survive(tmp_path: Path) -> None:
    fdt = Fdt(boot_cpuid_phys=3, memreserve=[(0x1000, 0x2000), (1 << 40, 0x10)])
    fdt.root.set(Property.from_string("model", "t"))
    again = Fdt.from_bytes(fdt.to_bytes())
    assert again.boot_cpuid_phys == 3 and again.memreserve == fdt.memreserve
    assert again.same_as(fdt)


def test_alias_paths() -> None:
    fdt = Fdt()
    fdt.root.add_child(Node("soc")).add_child(Node("uart@100"))
    fdt.root.add_child(Node("aliases")).set(Property.from_string("serial0", "/soc/uart@100"))
    assert fdt.find("serial0") is fdt.get("/soc/uart@100")
    assert fdt.find("serial0/x") is None and fdt.find("nope") is None
    assert fdt.find("//soc//uart") is fdt.get("/soc/uart@100")


# -- the carve-out overlay ------------------------------------------------------------


@needs_tools
@pytest.mark.parametrize("kind", ["plain", "numa"])
def test_compose_matches_dtc_and_fdtoverlay(
    kind: str, qemu_dtbs: dict[str, bytes], tmp_path: Path
) -> None:
    raw = qemu_dtbs[kind]
    base = Fdt.from_bytes(raw)
    region = NODE1 if kind == "numa" else (0x5F000000, 0x1000000)
    paths = [LAST_VIRTIO, "/virtio_mmio@a003c00"]
    overlay = compose_carveout(base, *region, paths)
    out = write_outputs(base, overlay, tmp_path / "out", "carve")
    dtbo, dtb = out["dtbo"].read_bytes(), out["dtb"].read_bytes()
    # our .dts compiles with dtc -@ to the same overlay as ours
    assert dtc_view(dtc_compile(out["dts"].read_text(), tmp_path, "-@"), tmp_path) == dtc_view(
        dtbo, tmp_path
    )
    # fdtoverlay applies our .dtbo to the raw QEMU blob exactly as apply_overlay does
    assert dtc_view(fdtoverlay(raw, [dtbo], tmp_path), tmp_path) == dtc_view(dtb, tmp_path)
    assert totalsize(dtb) == len(dtb) and totalsize(dtbo) == len(dtbo)

    applied = Fdt.from_bytes(dtb)
    pool = applied.get(f"/reserved-memory/restricted-dma@{region[0]:x}")
    assert pool.prop("compatible").as_string() == "restricted-dma-pool"
    assert pool.prop("reg").as_cells(2, 2) == [region]
    assert pool.phandle == base.max_phandle() + 1
    for path in paths:
        assert applied.get(path).prop("memory-region").as_u32() == pool.phandle
    assert applied.get("/__symbols__").prop("edgevirt_carveout").as_string() == (
        f"/reserved-memory/restricted-dma@{region[0]:x}"
    )
    assert "&edgevirt_carveout" in out["dts"].read_text()
    assert out["dts"].read_text().startswith("/dts-v1/;\n/plugin/;\n")


@needs_tools
def test_compose_merges_into_existing_reserved_memory(plain: Fdt, tmp_path: Path) -> None:
    rmem = plain.root.add_child(Node("reserved-memory"))
    rmem.set(Property.from_u32("#address-cells", 2))
    rmem.set(Property.from_u32("#size-cells", 2))
    rmem.set(Property.empty("ranges"))
    fw = rmem.add_child(Node("firmware@5e000000"))
    fw.set(Property.from_cells("reg", [(0x5E000000, 0x100000)], 2, 2))
    fw.set(Property.empty("no-map"))
    base_blob = plain.to_bytes()
    overlay = compose_carveout(plain, 0x5F000000, 0x800000, [LAST_VIRTIO])
    assert overlay.fragments[0].prop("target-path").as_string() == "/reserved-memory"
    ours = apply_overlay(plain, overlay).to_bytes()
    assert dtc_view(fdtoverlay(base_blob, [overlay.to_dtbo()], tmp_path), tmp_path) == dtc_view(
        ours, tmp_path
    )
    merged = Fdt.from_bytes(ours).get("/reserved-memory")
    assert list(merged.children) == ["restricted-dma@5f000000", "firmware@5e000000"]
    assert merged.prop("ranges").value == b""
    with pytest.raises(DeviceTreeError, match=r"0x5e000000-0x5e0fffff .*firmware@5e000000"):
        compose_carveout(plain, 0x5E0FF000, 0x2000, [LAST_VIRTIO])


@needs_tools
@pytest.mark.parametrize(
    ("region", "message"),
    [
        (
            (0x5BFFF000, 0x2000),
            r"0x5bfff000-0x5c000fff .*not lie inside one memory range.*"
            r"0x40000000-0x5bffffff",
        ),
        ((0x60000000, 0x1000), r"0x60000000-0x60000fff .*not lie inside"),
        ((0x3FFFF000, 0x2000), r"0x3ffff000.*not lie inside"),
        ((0x5C000800, 0x1000), r"0x5c000800.*0x1000-aligned"),
        ((0x5C000000, 0x1800), r"size 0x1800.*0x1000-aligned"),
        ((0x5C000000, 0), r"0x5c000000: size 0x0 must be positive"),
    ],
    ids=[
        "spans-two-memory-nodes",
        "above-ram",
        "below-ram",
        "base-misaligned",
        "size-misaligned",
        "empty",
    ],
)
def test_carveout_rule_checks(numa: Fdt, region: tuple[int, int], message: str) -> None:
    with pytest.raises(DeviceTreeError, match=message):
        compose_carveout(numa, *region, [LAST_VIRTIO])


@needs_tools
def test_carveout_must_not_overlap_memreserve(numa: Fdt) -> None:
    numa.memreserve.append((0x5C100000, 0x1000))
    with pytest.raises(
        DeviceTreeError,
        match=r"overlaps reserved region 0x5c100000-0x5c100fff"
        r".*/memreserve/",
    ):
        compose_carveout(numa, *NODE1, [LAST_VIRTIO])
    compose_carveout(numa, 0x5C101000, 0x1000, [LAST_VIRTIO])  # right next to it is fine


@needs_tools
@pytest.mark.parametrize(
    ("paths", "message"),
    [
        (["/virtio_mmio@a00fe00"], "'/virtio_mmio@a00fe00' is not in the base"),
        (["/pl011@9000000"], "/pl011@9000000: compatible .* does not include 'virtio,mmio'"),
        ([LAST_VIRTIO, LAST_VIRTIO], "listed twice"),
    ],
    ids=["virtio-path-missing", "not-virtio-mmio", "duplicate-path"],
)
def test_virtio_path_checks(numa: Fdt, paths: list[str], message: str) -> None:
    with pytest.raises(DeviceTreeError, match=message):
        compose_carveout(numa, *NODE1, paths)


@needs_tools
def test_virtio_node_already_using_a_region_or_bad_label(numa: Fdt) -> None:
    numa.get(LAST_VIRTIO).set(Property.from_u32("memory-region", 1))
    with pytest.raises(DeviceTreeError, match="already has a memory-region"):
        compose_carveout(numa, *NODE1, [LAST_VIRTIO])
    with pytest.raises(DeviceTreeError, match="invalid label"):
        compose_carveout(numa, *NODE1, [], name="bad-label")


# -- overlays in general, against fdtoverlay ------------------------------------------

BASE_DTS = """/dts-v1/;
/memreserve/ 0x48000000 0x100000;
/ {
	#address-cells = <2>;
	#size-cells = <2>;
	compatible = "test,base";
	interrupt-parent = <&intc>;
	intc: interrupt-controller@8000000 {
		#interrupt-cells = <3>;
		interrupt-controller;
		reg = <0 0x8000000 0 0x10000>;
	};
	bus: bus@1000 {
		#address-cells = <1>;
		#size-cells = <1>;
		ranges;
		dev0: dev@1000 { reg = <0x1000 0x100>; status = "disabled"; clocks = <&intc 1>; };
	};
	aliases { serial0 = "/bus@1000/dev@1000"; };
};
"""


def general_overlay() -> Overlay:
    ov = Overlay(description="general overlay\nwith two lines")
    node = ov.add_fragment(target_label="dev0")
    node.set(Property.from_string("status", "okay"))
    node.set(Property.from_u32("clock-frequency", 24000000))
    child = node.add_child(Node("child@0", labels=["ovchild"]))
    child.set(Property.from_u32("interrupt-parent", Ref("intc")))
    child.set(Property.from_u32("link", Ref("ovchild"), 5, Ref("dev0"), Ref("newdev")))
    newdev = ov.add_fragment("/bus@1000").add_child(Node("dev@2000", labels=["newdev"]))
    newdev.set(Property.from_cells("reg", [(0x2000, 0x100)], 1, 1))
    ov.add_fragment("serial0").set(Property.from_string("label", "via alias"))
    top = ov.add_fragment("/")
    top.set(Property.from_string("model", "overlaid"))
    top.add_child(Node("consumer")).set(Property.from_u32("peer", Ref("newdev"), Ref("bus")))
    return ov


@needs_tools
def test_overlay_compiles_like_dtc(tmp_path: Path) -> None:
    ov = general_overlay()
    by_dtc = dtc_compile(ov.to_dts(), tmp_path, "-@")
    assert ov.to_dtbo() == by_dtc
    fdt = ov.to_fdt()
    assert fdt.get("/__fixups__").prop("dev0").as_strings() == [
        "/fragment@0:target:0",
        "/fragment@0/__overlay__/child@0:link:8",
    ]
    assert fdt.get("/__local_fixups__/fragment@0/__overlay__/child@0").prop(
        "link"
    ).as_u32_list() == [0, 12]


def test_overlay_source_rules() -> None:
    ov = Overlay()
    with pytest.raises(DeviceTreeError, match="exactly one of target_path, target_label"):
        ov.add_fragment()
    ov.add_fragment("/").add_child(Node("a", labels=["same"]))
    ov.add_fragment("/").add_child(Node("b", labels=["same"]))
    with pytest.raises(DeviceTreeError, match="label 'same' is on both .*/a and .*/b"):
        ov.to_fdt()
    with pytest.raises(DeviceTreeError, match="invalid label"):
        Property.from_u32("x", Ref("no-dashes"))


@needs_tools
def test_apply_matches_fdtoverlay(tmp_path: Path) -> None:
    base_blob = dtc_compile(BASE_DTS, tmp_path, "-@")
    base = Fdt.from_bytes(base_blob)
    ov = general_overlay()
    ours = apply_overlay(base, ov)
    expected = fdtoverlay(base_blob, [ov.to_dtbo()], tmp_path)
    assert dtc_view(ours.to_bytes(), tmp_path) == dtc_view(expected, tmp_path)
    # the same for a .dtbo that dtc compiled (our apply on a blob not made by us)
    dtbo = Fdt.from_bytes(dtc_compile(ov.to_dts(), tmp_path, "-@"))
    assert apply_overlay(base, dtbo).same_as(ours)
    # inputs untouched; phandles of the overlay moved past the base's
    assert base.same_as(Fdt.from_bytes(base_blob))
    assert ours.get("/bus@1000/dev@2000").phandle == base.max_phandle() + 2
    assert ours.get("/__symbols__").prop("newdev").as_string() == "/bus@1000/dev@2000"
    # a second overlay can use a label the first one brought in
    ov2 = Overlay()
    ov2.add_fragment(target_label="newdev").set(Property.from_u32("back", Ref("ovchild")))
    twice = apply_overlay(ours, ov2)
    expected2 = fdtoverlay(base_blob, [ov.to_dtbo(), ov2.to_dtbo()], tmp_path)
    assert dtc_view(twice.to_bytes(), tmp_path) == dtc_view(expected2, tmp_path)


@needs_tools
def test_apply_errors_name_fragment_and_label(plain: Fdt) -> None:
    ov = Overlay()
    ov.add_fragment(target_label="uart0").set(Property.from_string("status", "okay"))
    with pytest.raises(DeviceTreeError, match="'uart0'.*/fragment@0:target:0.*no __symbols__"):
        apply_overlay(plain, ov)
    missing = Overlay()
    missing.add_fragment("/virtio_mmio@a00fe00").set(Property.empty("x"))
    with pytest.raises(DeviceTreeError, match="fragment@0: target-path '/virtio_mmio@a00fe00'"):
        apply_overlay(plain, missing)
    plain.root.add_child(Node("__symbols__")).set(Property.from_string("other", "/psci"))
    with pytest.raises(DeviceTreeError, match="'uart0'.*not in the base's __symbols__"):
        apply_overlay(plain, ov)
    bad = Fdt()
    frag = bad.root.add_child(Node("fragment@3"))
    frag.add_child(Node("__overlay__"))
    with pytest.raises(DeviceTreeError, match="fragment@3: has __overlay__ but neither"):
        apply_overlay(plain, bad)
    frag.set(Property.from_u32("target", 0x7777))
    with pytest.raises(DeviceTreeError, match="fragment@3: target phandle 0x7777"):
        apply_overlay(plain, bad)
    frag.set(Property.from_u32("target", 0xFFFFFFFF))
    with pytest.raises(DeviceTreeError, match="fragment@3: target .*not a resolved"):
        apply_overlay(plain, bad)
    lf = bad.root.add_child(Node("__local_fixups__"))
    lf.add_child(Node("fragment@3")).set(Property.from_u32("target", 8))
    with pytest.raises(DeviceTreeError, match="offset 8 is beyond the 4-byte"):
        apply_overlay(plain, bad)


def _patched_dtbo(path: str, name: str, value: bytes) -> Fdt:
    """The general overlay, compiled, with one property's value replaced by raw bytes."""
    dtbo = general_overlay().to_fdt()
    dtbo.get(path).properties[name] = Property(name, value)
    return dtbo


@needs_tools
@pytest.mark.parametrize(
    "path,name,value,where,offset,byte",
    [
        # target-path "/bus@1000" with its '@' swapped for a byte >= 0x80
        ("/fragment@1", "target-path", b"/bus\xc01000\0", "fragment@1: property 'target-path'",
         4, 0xC0),
        ("/__symbols__", "newdev", b"/fragment@1/__overlay__/dev\x802000\0",
         "overlay __symbols__: property 'newdev'", 27, 0x80),
        ("/__fixups__", "intc", b"/fragment@0/__overlay__/child@0:interrupt-parent:0\0"
         b"/fragment@3/__overlay__/consumer:pe\xffr:4\0", "__fixups__: property 'intc'", 86, 0xFF),
        ("/__fixups__", "intc", b"/fragment@0/__overlay__/child@0:interrupt-parent:0\x01\0",
         "__fixups__: property 'intc'", 50, 0x01),
    ],
)  # fmt: skip
def test_non_ascii_label_or_path_in_overlay_is_an_error_naming_property_and_offset(
    tmp_path: Path, path: str, name: str, value: bytes, where: str, offset: int, byte: int
) -> None:
    """Regression: bytes >= 0x80 became U+FFFD, so a different node was targeted or recorded."""
    base = Fdt.from_bytes(dtc_compile(BASE_DTS, tmp_path, "-@"))
    with pytest.raises(DeviceTreeError) as ei:
        apply_overlay(base, _patched_dtbo(path, name, value))
    msg = str(ei.value)
    assert msg.startswith(where), msg
    assert f"byte {byte:#04x} at offset {offset} " in msg, msg


@needs_tools
def test_non_ascii_base_symbol_is_an_error_naming_property_and_offset(tmp_path: Path) -> None:
    base = Fdt.from_bytes(dtc_compile(BASE_DTS, tmp_path, "-@"))
    base.get("/__symbols__").properties["intc"] = Property(
        "intc", "/interrupt-controller@8000000\u00e9".encode() + b"\0"
    )
    with pytest.raises(
        DeviceTreeError, match=r"base __symbols__: property 'intc': byte 0xc3 at offset 29 "
    ):
        apply_overlay(base, general_overlay())


# -- malformed blobs --------------------------------------------------------------------


def small_blob() -> bytes:
    fdt = Fdt(memreserve=[(0x1000, 0x1000)])
    fdt.root.set(Property.from_string("compatible", "x"))
    child = fdt.root.add_child(Node("child@1"))
    child.set(Property.from_u32("reg", 1))
    child.set(Property.from_string("compatible", "y"))
    return fdt.to_bytes()


def patch(blob: bytes, off: int, value: int) -> bytes:
    out = bytearray(blob)
    struct.pack_into(">I", out, off, value)
    return bytes(out)


def header(blob: bytes) -> dict[str, int]:
    names = (
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
    return dict(zip(names, struct.unpack_from(">10I", blob), strict=True))


def test_malformed_blobs_name_offset_and_expectation() -> None:
    blob = small_blob()
    h = header(blob)
    s = h["off_dt_struct"]
    cases = {
        "bad magic": (patch(blob, 0, 0xD00DFEEE), r"offset 0x0: expected magic d00dfeed"),
        "old version": (patch(blob, 20, 3), r"offset 0x14 \(version = 0x3\): expected 16 or 17"),
        "future version": (patch(blob, 24, 18), r"offset 0x18 \(last_comp_version = 0x12\)"),
        "truncated": (blob[:-1], r"offset 0x4 \(totalsize = .* available \(truncated"),
        "struct out of range": (
            patch(blob, 8, h["totalsize"]),
            r"offset 0x8 \(off_dt_struct = 0x.*\): expected a block",
        ),
        "strings out of range": (
            patch(blob, 32, 0x1000),
            r"offset 0xc \(off_dt_strings.*size 0x1000",
        ),
        "misaligned struct": (patch(patch(blob, 8, s + 1), 36, 0), r"4-byte aligned"),
        "bad token": (patch(blob, s + 8, 7), rf"offset {s + 8:#x}: expected a token.*found 0x7"),
        "bad first token": (patch(blob, s, 3), r"FDT_PROP outside any node"),
        "unterminated string": (
            patch(blob, 32, h["size_dt_strings"] - 1),
            r"NUL-terminated property name.*"
            r"unterminated",
        ),
        "name offset out of range": (
            patch(blob, s + 16, 0x999),
            r"name offset 0x999 is outside the strings block",
        ),
        "value past end": (patch(blob, s + 12, 0x10000), r"value of 0x10000 bytes .* runs past"),
        "missing FDT_END": (
            patch(blob, 36, h["size_dt_struct"] - 4),
            r"expected a structure-block token \(FDT_END missing",
        ),
        "FDT_END too early": (patch(blob, s + 8, 9), r"expected FDT_END_NODE, found FDT_END"),
        "rsvmap runs off": (patch(blob, 16, h["totalsize"] - 8), r"16-byte /memreserve/"),
    }
    for name, (bad, message) in cases.items():
        with pytest.raises(DeviceTreeError, match=message):
            Fdt.from_bytes(bad)
        assert name


def test_structural_rules() -> None:
    """Hand-made struct blocks: duplicate names, property after subnode, two roots."""

    def build(tokens: bytes, strings: bytes = b"a\0") -> bytes:
        rsv = b"\0" * 16
        off_struct = 40 + len(rsv)
        total = off_struct + len(tokens) + len(strings)
        hdr = struct.pack(
            ">10I",
            0xD00DFEED,
            total,
            off_struct,
            off_struct + len(tokens),
            40,
            17,
            16,
            0,
            len(strings),
            len(tokens),
        )
        return hdr + rsv + tokens + strings

    def node(name: bytes) -> bytes:
        raw = name + b"\0"
        return struct.pack(">I", 1) + raw + b"\0" * (-len(raw) % 4)

    prop = struct.pack(">III", 3, 0, 0)
    end, fin = struct.pack(">I", 2), struct.pack(">I", 9)
    ok = build(node(b"") + prop + node(b"c") + end + end + fin)
    assert list(Fdt.from_bytes(ok).root.children) == ["c"]
    for tokens, message in [
        (node(b"") + prop + prop + end + fin, "duplicate property 'a'"),
        (node(b"") + node(b"c") + end + node(b"c") + end + end + fin, "duplicate node name"),
        (node(b"") + node(b"c") + end + prop + end + fin, "FDT_PROP after a subnode"),
        (node(b"") + end + node(b"") + end + fin, "second top-level node"),
        (node(b"x") + end + fin, "expected the root node"),
        (node(b"") + node(b"b d") + end + end + fin, "node name of"),
        (node(b"") + end + end + fin, "FDT_END_NODE with no node open"),
        (fin, "no root node"),
        (node(b"") + struct.pack(">I", 1) + b"abcd", "unterminated"),
        (node(b"") + node(b"c") * 70, "deeper than 64"),
    ]:
        with pytest.raises(DeviceTreeError, match=message):
            Fdt.from_bytes(build(tokens))


@needs_tools
def test_truncation_everywhere(qemu_dtbs: dict[str, bytes]) -> None:
    blob = Fdt.from_bytes(qemu_dtbs["numa"]).to_bytes()
    for cut in range(0, len(blob), 3):
        for data in (blob[:cut], patch(blob[:cut], 4, cut) if cut >= 8 else blob[:cut]):
            with pytest.raises(DeviceTreeError):
                Fdt.from_bytes(data)
    # a lying header: struct block claimed shorter, at every 4-byte step
    h = header(blob)
    for size in range(0, h["size_dt_struct"], 4):
        with pytest.raises(DeviceTreeError, match="offset 0x"):
            Fdt.from_bytes(patch(blob, 36, size))


def check_parse(data: bytes) -> None:
    """Parsing gives a tree or a DeviceTreeError, nothing else; a tree survives a round trip."""
    try:
        fdt = Fdt.from_bytes(data)
    except DeviceTreeError as exc:
        assert str(exc)
        return
    again = Fdt.from_bytes(fdt.to_bytes())
    assert again.same_as(fdt)
    fdt.to_dts()


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    check_parse(data)
    check_parse(small_blob()[:40] + data)


@settings(max_examples=1500, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 400), st.integers(0, 0xFFFFFFFF)), max_size=4),
    st.integers(0, 400),
)
def test_fuzz_mutations(mutations: list[tuple[int, int]], cut: int) -> None:
    blob = small_blob()
    data = bytearray(blob)
    for off, value in mutations:
        off = min(off, len(data) - 4) & ~3
        struct.pack_into(">I", data, off, value)
    check_parse(bytes(data))
    check_parse(bytes(data[: max(cut, 40)]))


@needs_tools
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.integers(0, 1 << 16), st.one_of(st.integers(0, 16), st.integers(0, 0xFFFFFFFF))
        ),
        min_size=1,
        max_size=3,
    )
)
def test_fuzz_qemu_struct_block(
    qemu_dtbs: dict[str, bytes], mutations: list[tuple[int, int]]
) -> None:
    """Tokens, lengths and name offsets of a real blob overwritten: only DeviceTreeError."""
    blob = bytearray(Fdt.from_bytes(qemu_dtbs["numa"]).to_bytes())
    h = header(bytes(blob))
    for off, value in mutations:
        off = h["off_dt_struct"] + (off % h["size_dt_struct"]) // 4 * 4
        struct.pack_into(">I", blob, off, value)
    check_parse(bytes(blob))


NAMES = st.text("abcdefghijklmnopqrstuvwxyz0123456789,._+-", min_size=1, max_size=8)


@st.composite
def trees(draw: st.DrawFn, depth: int = 0) -> Node:
    node = Node("n" + draw(NAMES) + draw(st.sampled_from(["", "@1", "@ab"])))
    for name in draw(st.lists(NAMES, max_size=4, unique=True)):
        value = draw(
            st.one_of(
                st.binary(max_size=12),
                st.lists(
                    st.text('abcXYZ 09-="\\', min_size=1, max_size=6), min_size=1, max_size=3
                ).map(lambda ts: "\0".join(ts).encode() + b"\0"),
            )
        )
        node.set(Property("p" + name, value))
    if depth < 3:
        for child in draw(st.lists(trees(depth + 1), max_size=3)):
            if child.name not in node.children:
                node.add_child(child)
    return node


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    root=trees(),
    memreserve=st.lists(
        st.tuples(st.integers(0, (1 << 64) - 1), st.integers(1, 1 << 40)), max_size=2
    ),
)
def test_random_trees_roundtrip_and_dtc_agrees(
    root: Node, memreserve: list[tuple[int, int]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    fdt = Fdt(Node("", root.properties, root.children), memreserve=memreserve)
    blob = fdt.to_bytes()
    assert totalsize(blob) == len(blob)
    assert Fdt.from_bytes(blob).same_as(fdt)
    if shutil.which("dtc"):
        tmp = tmp_path_factory.mktemp("rt")
        assert dtc_view(dtc_compile(fdt.to_dts(), tmp), tmp) == dtc_view(blob, tmp)
