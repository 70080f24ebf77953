"""Xen dom0less without booting anything: the .deb reader on Debian's Xen package, the host
device-tree composer checked by dtc, its validation errors, the console demultiplexer, and
the service domU's view of its bus node."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from edgevirt.backend.transport.virtio_msg.xenlink import find_bus_node
from edgevirt.console.xen import INPUT_PAUSE, XEN, XenConsoleMux, XenDomainConsole
from edgevirt.devicetree.fdt import Fdt, Node, Property
from edgevirt.devicetree.xen import (
    PassthroughNode,
    XenDomain,
    XenEvtchn,
    XenRegion,
    XenSystem,
    compose_xen,
)
from edgevirt.errors import DeviceTreeError, VirtioMsgError
from edgevirt.platforms.xen_system import XenLayout, xen_system

# -- composer ---------------------------------------------------------------------------------


def _base(ram: tuple[int, int] = (0x40000000, 0x80000000)) -> Fdt:
    fdt = Fdt()
    fdt.root.set(Property.from_u32("#address-cells", 2))
    fdt.root.set(Property.from_u32("#size-cells", 2))
    mem = fdt.root.add_child(Node(f"memory@{ram[0]:x}"))
    mem.set(Property.from_string("device_type", "memory"))
    mem.set(Property.from_cells("reg", [ram], 2, 2))
    fdt.root.add_child(Node("chosen"))
    return fdt


def _files(tmp_path: Path) -> tuple[Path, Path, Path]:
    kernel, fe_rd, svc_rd = tmp_path / "Image", tmp_path / "fe.cpio", tmp_path / "svc.cpio"
    kernel.write_bytes(b"k" * 0x300000)
    fe_rd.write_bytes(b"r" * 0x100000)
    svc_rd.write_bytes(b"s" * 0x400000)
    return kernel, fe_rd, svc_rd


def _system(tmp_path: Path, layout: XenLayout | None = None) -> XenSystem:
    kernel, fe_rd, svc_rd = _files(tmp_path)
    return xen_system(layout or XenLayout(), kernel=kernel, frontend_initrd=fe_rd,
                      service_initrd=svc_rd)  # fmt: skip


def _dts(path: Path) -> str:
    return subprocess.run(["dtc", "-I", "dtb", "-O", "dts", str(path)], capture_output=True,
                          text=True, check=True).stdout  # fmt: skip


@pytest.mark.skipif(not shutil.which("dtc"), reason="dtc not installed")
def test_host_dtb_has_domains_modules_evtchns_and_reserved_regions(tmp_path: Path) -> None:
    xdt = compose_xen(_base(), _system(tmp_path), tmp_path / "dt")
    dts = _dts(xdt.host_dtb)
    assert 'xen,xen-bootargs = "console=dtuart dtuart=/pl011@9000000 xsm=dummy' in dts
    for dom in ("frontend", "service"):
        assert f"\t\t{dom} {{" in dts
    assert dts.count('compatible = "xen,domain";') == 2
    assert dts.count('xen,enhanced = "no-xenstore";') == 2
    assert dts.count('"multiboot,kernel\\0multiboot,module"') == 2
    assert dts.count('"multiboot,device-tree\\0multiboot,module"') == 2
    # Each event channel end names the other end's phandle.
    host = Fdt.from_bytes(xdt.host_dtb.read_bytes())
    fe = host.get("/chosen/frontend/evtchn-10")
    svc = host.get("/chosen/service/evtchn-11")
    assert fe.prop("xen,evtchn").as_u32_list() == [10, svc.phandle]
    assert svc.prop("xen,evtchn").as_u32_list() == [11, fe.phandle]
    carve = host.get("/reserved-memory/carveout@a0000000")
    assert carve.prop("reg").as_cells(2, 2) == [(0xA0000000, 64 << 20)]
    assert "no-map" in carve.properties
    # Modules sit where the load plan says, one after another, none overlapping.
    spans = sorted((ld.addr, ld.addr + ld.size) for ld in xdt.loads)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    for ld in xdt.loads:
        kind = ld.what.split()[1]
        node = host.get(f"/chosen/{ld.what.split()[0]}/module@{ld.addr:x}")
        assert node.prop("reg").as_u32_list() == [ld.addr, ld.size]
        assert f"multiboot,{kind}" in node.prop("compatible").as_strings()
    assert xdt.host_dtb.stat().st_size == len(host.to_bytes())  # compact: QEMU needs it


@pytest.mark.skipif(not shutil.which("dtc"), reason="dtc not installed")
def test_partial_dtb_maps_both_regions_with_xen_reg(tmp_path: Path) -> None:
    xdt = compose_xen(_base(), _system(tmp_path), tmp_path / "dt")
    fe = Fdt.from_bytes(xdt.partials["frontend"].read_bytes())
    node = fe.get("/passthrough/virtio-msg@3a000000")
    assert node.prop("reg").as_cells(2, 2) == [(0x3A000000, 0x10000), (0x3C000000, 64 << 20)]
    assert node.prop("xen,reg").as_u32_list() == [
        0,
        0xA4000000,
        0,
        0x10000,
        0,
        0x3A000000,
        0,
        0xA0000000,
        0,
        64 << 20,
        0,
        0x3C000000,
    ]
    assert "xen,force-assign-without-iommu" in node.properties
    assert node.prop("edgevirt,role").as_string() == "frontend"
    assert node.prop("edgevirt,doorbell").as_string() == "xen-evtchn"
    assert node.prop("edgevirt,evtchn").as_u32() == 10
    svc = Fdt.from_bytes(xdt.partials["service"].read_bytes())
    snode = svc.get("/passthrough/virtio-msg@3a000000")
    assert snode.prop("edgevirt,role").as_string() == "backend"
    assert snode.prop("edgevirt,evtchn").as_u32() == 11
    assert "passthrough {" in _dts(xdt.partials["service"])  # dtc reads it back
    # What each side sees: the service domain's map has its RAM and the two regions only.
    assert [r["base"] for r in xdt.domain_maps["service"]] == [0x3A000000, 0x3C000000,
                                                               0x40000000]  # fmt: skip


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        (XenLayout(carveout_host=0xA0000800), "multiples of the 0x1000-byte page"),
        (XenLayout(msg_host=0xA2000000), "carveout [0xa0000000, 0xa4000000) overlaps region msg"),
        (XenLayout(carveout_host=0xC0000000), "lies outside host RAM [0x40000000, 0xc0000000)"),
        (XenLayout(carveout_host=0x50000000), "overlaps module frontend kernel"),
        (XenLayout(carveout_host=0x40000000), "overlaps Xen image and DTB"),
        (XenLayout(carveout_guest=0x40000000), "outside the free window"),
        (
            XenLayout(msg_guest=0x3C000000, carveout_guest=0x3C000000),
            "region carveout at guest [0x3c000000, 0x40000000) overlaps region msg",
        ),
        (XenLayout(service_mem=4 << 30), "domains need 4352 MiB of RAM"),
        (XenLayout(frontend_port=0), "port frontend:0 is taken or outside 1..4095"),
    ],
)
def test_bad_layouts_are_refused_naming_addresses(
    tmp_path: Path, layout: XenLayout, message: str
) -> None:
    with pytest.raises(DeviceTreeError) as e:
        compose_xen(_base(), _system(tmp_path, layout), tmp_path / "dt")
    assert message in str(e.value)
    assert not (tmp_path / "dt" / "host.dtb").exists()  # nothing written


def test_module_that_does_not_fit_host_ram(tmp_path: Path) -> None:
    system = _system(tmp_path)
    want = r"module frontend device-tree \(frontend.dtb, 0x[0-9a-f]+ bytes\) at .* does not fit"
    with pytest.raises(DeviceTreeError, match=want):
        compose_xen(_base((0x40000000, 0x10600000)), system, tmp_path / "dt")


def test_passthrough_node_must_name_a_region_of_its_domain(tmp_path: Path) -> None:
    kernel, rd, _ = _files(tmp_path)
    system = XenSystem(
        [XenDomain("a", 128 << 20, kernel, "", rd,
                   passthrough=[PassthroughNode("shm@3a000000", ("shm",))]),
         XenDomain("b", 128 << 20, kernel, "", rd)],
        [XenRegion("shm", 0xA0000000, 0x1000, 0x3A000000, ("b",))],
        [XenEvtchn(("a", 5), ("b", 6))],
    )  # fmt: skip
    with pytest.raises(DeviceTreeError, match="names region 'shm', which is not mapped into a"):
        compose_xen(_base(), system, tmp_path / "dt")


def _reserve(fdt: Fdt, base: int, size: int) -> Fdt:
    rm = fdt.root.add_child(Node("reserved-memory"))
    rm.set(Property.from_u32("#address-cells", 2))
    rm.set(Property.from_u32("#size-cells", 2))
    rm.set(Property.empty("ranges"))
    fw = rm.add_child(Node(f"firmware@{base:x}"))
    fw.set(Property.from_cells("reg", [(base, size)], 2, 2))
    fw.set(Property.empty("no-map"))
    return fdt


@pytest.mark.parametrize(
    "base, size, message",
    [(0x50000000, 0x10000, r"module frontend kernel .* overlaps /reserved-memory/firmware@"),
     (0xA0000000, 0x1000, r"region carveout .* overlaps /reserved-memory/firmware@a0000000"),
     (0x3FFFF000, 0x2000, r"reserves \[0x3ffff000, 0x40001000\) .* where Xen")],
    ids=["module", "region", "xen"],
)  # fmt: skip
def test_base_reserved_memory_is_never_used(tmp_path: Path, base, size, message) -> None:
    """Regression (fuzz/fuzz_xen.py): memory the base tree already reserves (a real board's
    firmware or secure OS) got modules and shared regions placed over it."""
    with pytest.raises(DeviceTreeError, match=message):
        compose_xen(_reserve(_base(), base, size), _system(tmp_path), tmp_path / "dt")
    assert not (tmp_path / "dt" / "host.dtb").exists()


def test_passthrough_node_naming_an_unknown_region_is_refused(tmp_path: Path) -> None:
    """Regression (fuzz/fuzz_xen.py): a passthrough node naming no region at all raised
    KeyError out of partial_dt."""
    kernel, rd, _ = _files(tmp_path)
    system = XenSystem(
        [XenDomain("a", 128 << 20, kernel, "", rd,
                   passthrough=[PassthroughNode("shm@3a000000", ("ghost",))])], [], [],
    )  # fmt: skip
    with pytest.raises(DeviceTreeError, match="names region 'ghost'"):
        compose_xen(_base(), system, tmp_path / "dt")


@pytest.mark.parametrize("name", ["a b", "x/y", "../../esc"])
def test_domain_name_that_is_no_node_name_is_refused_before_writing(tmp_path: Path, name) -> None:
    """Regression (fuzz/fuzz_xen.py): a domain name with a space wrote its partial DTB, then
    raised KeyError while composing /chosen; the name is also a file name."""
    kernel, rd, _ = _files(tmp_path)
    system = XenSystem([XenDomain(name, 128 << 20, kernel, "", rd)])
    with pytest.raises(DeviceTreeError, match="invalid xen: domain name"):
        compose_xen(_base(), system, tmp_path / "dt" / "sub")
    assert not list(tmp_path.rglob("*.dtb"))


# -- the Xen .deb -----------------------------------------------------------------------------


def test_missing_xen_deb_without_apt_is_a_setup_error(tmp_path: Path, monkeypatch) -> None:
    from edgevirt.errors import SetupError
    from edgevirt.image import initramfs, xen

    # The download is the shared one in initramfs: apt-get is looked up there.
    monkeypatch.setattr(initramfs.shutil, "which", lambda name: None)
    with pytest.raises(SetupError, match="apt-get not found") as e:
        xen.fetch_xen(tmp_path)
    assert "xen-hypervisor-4.17-arm64_*_arm64.deb" in (e.value.hint or "")


def test_extract_rejects_a_deb_without_xen(tmp_path: Path) -> None:
    from edgevirt.image.initramfs import download_busybox_deb
    from edgevirt.image.xen import extract_xen

    try:
        deb = download_busybox_deb(tmp_path)
    except Exception as e:  # noqa: BLE001 - no apt on this machine: nothing to read
        pytest.skip(f"no busybox .deb: {e}")
    with pytest.raises(Exception, match="no /boot/xen-"):
        extract_xen(deb, tmp_path / "out")


# -- console demultiplexer --------------------------------------------------------------------


class FakeUart:
    """Xen's side of the UART: lines out, our input recorded; Ctrl-A×3 moves the focus."""

    def __init__(self, lines: list[bytes]) -> None:
        self.out = bytearray(b"".join(lines))
        self.written = bytearray()
        self.timeout = 0.05
        self.cycle = ["DOM0", "DOM1", "DOM2", "Xen"]
        self.focus = 0
        self.ctrl = 0
        self.on_line: dict[bytes, bytes] = {}

    def read(self, n: int = 1) -> bytes:
        data = bytes(self.out[:n])
        del self.out[:n]
        return data

    @property
    def in_waiting(self) -> int:
        return len(self.out)

    def write(self, data: bytes) -> int:
        for b in data:
            if b == 1:
                self.ctrl += 1
                if self.ctrl == 3:
                    self.ctrl = 0
                    self.focus = (self.focus + 1) % len(self.cycle)
                    self.out += (
                        f"(XEN) *** Serial input to {self.cycle[self.focus]} "
                        "(type 'CTRL-a' three times to switch input)\r\n"
                    ).encode()
                continue
            self.written.append(b)
            if b == 10:
                line = bytes(self.written).split(b"\n")[-2]
                for key, reply in self.on_line.items():
                    if key in line:
                        self.out += reply
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_mux_splits_domains_and_joins_xens_cut_lines() -> None:
    long = b"x" * 126
    uart = FakeUart([
        b"(XEN) Xen version 4.17.7\r\n",
        b"(XEN) DOM1: hello front\r\r\n",
        b"(XEN) DOM2: hello service\r\r\n",
        b"(XEN) DOM1: " + long + b"\r\n",  # Xen's buffer was full: the line goes on
        b"(XEN) DOM1: tail\r\r\n",
        b"(XEN) DOM2: " + long + b"\r\r\n",  # a real line of exactly 126 characters
    ])  # fmt: skip
    mux = XenConsoleMux(uart)  # type: ignore[arg-type]
    one, two = mux.port_for(1), mux.port_for(2)
    for _ in range(5):
        mux.pump(0)
    assert one.read(1000) == b"hello front\n" + long + b"tail\n"
    assert two.read(1000) == b"hello service\n" + long + b"\n"
    assert mux.xen_lines == ["(XEN) Xen version 4.17.7"]


def test_domain_console_switches_focus_and_parks_on_xen() -> None:
    uart = FakeUart([])
    mux = XenConsoleMux(uart)  # type: ignore[arg-type]
    con = XenDomainConsole(mux.port_for(2), name="service")
    # The marker cut by Xen while the domain still had the focus still counts.
    uart.on_line[b"EV''B"] = (
        b"(XEN) E\r\n(XEN) DOM2: VB1\r\r\n(XEN) DOM2: hi\r\r\n(XEN) DOM2: EVE1 0\r\r\n"
    )
    r = con.run("echo hi", 5)
    assert (r.status, r.output) == (0, "hi")
    assert mux.focus == XEN  # parked: no domain prints unprefixed
    assert b"c='echo hi'; sleep 0.3; if [ ${#c} = 7 ]" in uart.written


def test_domain_console_resends_a_command_that_lost_characters() -> None:
    uart = FakeUart([])
    mux = XenConsoleMux(uart)  # type: ignore[arg-type]
    con = XenDomainConsole(mux.port_for(1), name="frontend")
    con.answer_timeout = 0.5
    replies = [b"(XEN) DOM1: EVX1\r\r\n", b"(XEN) DOM1: EVB2\r\r\n(XEN) DOM1: EVE2 0\r\r\n"]
    uart.on_line[b"if [ "] = b""

    def write(data: bytes, orig=uart.write) -> int:  # type: ignore[no-untyped-def]
        n = orig(data)
        if data.endswith(b"\n" + b"\x01" * 3) or data.endswith(b"fi\n"):
            uart.out += replies.pop(0)
        return n

    uart.write = write  # type: ignore[method-assign]
    r = con.run("true", 5)
    assert r.status == 0 and not replies
    assert b"\x03" in uart.written  # the half line was dropped before the second try
    # the loss slowed the input down; the intact second try brought the pace back
    assert mux.pause == INPUT_PAUSE


def test_input_pace_backs_off_on_loss_and_recovers() -> None:
    mux = XenConsoleMux(FakeUart([]))  # type: ignore[arg-type]
    for _ in range(5):
        mux.slow_down()
    assert mux.pause == 0.2  # bounded
    mux.speed_up()
    assert mux.pause == 0.1
    for _ in range(5):
        mux.speed_up()
    assert mux.pause == INPUT_PAUSE


# -- the service domU's bus node --------------------------------------------------------------


def _node(root: Path, name: str, role: bytes, cells: list[int], port: int) -> None:
    d = root / name
    d.mkdir(parents=True)
    (d / "edgevirt,role").write_bytes(role + b"\0")
    (d / "reg").write_bytes(struct.pack(f">{len(cells)}I", *cells))
    (d / "edgevirt,evtchn").write_bytes(struct.pack(">I", port))


def test_bus_node_found_by_role(tmp_path: Path) -> None:
    _node(tmp_path, "virtio-msg@3a000000", b"backend",
          [0, 0x3A000000, 0, 0x10000, 0, 0x3C000000, 0, 0x4000000], 11)  # fmt: skip
    node = find_bus_node(tmp_path)
    assert (node.msg, node.carveout, node.port) == (
        (0x3A000000, 0x10000), (0x3C000000, 0x4000000), 11)  # fmt: skip


def test_bus_node_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(VirtioMsgError, match="no virtio-msg node with edgevirt,role"):
        find_bus_node(tmp_path)
    _node(tmp_path, "virtio-msg@3a000000", b"backend", [0, 0x3A000000, 0, 0x10000], 11)
    with pytest.raises(VirtioMsgError, match=r"reg: 4 cells, expected 8"):
        find_bus_node(tmp_path)


# -- U-Boot boot script -----------------------------------------------------------------------


@pytest.mark.skipif(not shutil.which("mkimage"), reason="u-boot-tools not installed")
def test_boot_script_loads_every_module_at_its_planned_address(tmp_path: Path) -> None:
    from edgevirt.platforms.xen_uboot import DTB_ADDR, XEN_ADDR, write_boot_script

    xdt = compose_xen(_base(), _system(tmp_path), tmp_path / "dt")
    xen = tmp_path / "xen-4.17-arm64"
    xen.write_bytes(b"x" * 4096)
    bs = write_boot_script(xdt, xen, tmp_path / "tftp")
    lines = bs.cmd.read_text().splitlines()
    assert f"tftpb {XEN_ADDR:#x} xen" in lines
    assert f"tftpb {DTB_ADDR:#x} host.dtb" in lines
    for ld in xdt.loads:
        name = ld.what.replace(" ", "-")
        assert f"tftpb {ld.addr:#x} {name}" in lines
        assert (bs.dir / name).read_bytes() == ld.path.read_bytes()
    assert lines[-1] == f"booti {XEN_ADDR:#x} - {DTB_ADDR:#x}"
    listing = subprocess.run(["dumpimage", "-l", str(bs.scr)], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
    assert "Linux Script" in listing and "edgevirt xen dom0less" in listing


def test_boot_option_outside_xen_is_refused(tmp_path: Path) -> None:
    from edgevirt.errors import ConfigError
    from edgevirt.up import UpOptions, up

    with pytest.raises(ConfigError, match="--boot uboot applies to --platform xen only"):
        up(UpOptions(tmp_path, boot="uboot"))


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"transport": "vhost-user"}, "--platform xen runs virtio-msg"),
        ({"backend": "host"}, "--platform xen runs virtio-msg"),
        ({"fault": "service-restart"}, "fault 'service-restart' not supported"),
        ({"restrict": False}, "takes no --spec or --no-restrict"),
        ({"boot": "pxe"}, "--boot pxe: expected direct or uboot"),
    ],
)
def test_xen_platform_refuses_options_it_cannot_honour(
    tmp_path: Path, opts: dict, message: str
) -> None:
    from edgevirt.errors import ConfigError
    from edgevirt.up import UpOptions, up

    with pytest.raises(ConfigError, match=message):
        up(UpOptions(tmp_path / "b", platform="xen", **opts))
    assert not (tmp_path / "b").exists()  # nothing built, nothing started
