"""The system composer on every shipped board, against real DTBs and the real tools.

Base DTBs are got the way a user gets them: QEMU's dumpdtb, and the upstream board DTBs
built from the cached Linux tree (`edgevirt dt fetch`). Oracles: fdtoverlay (libfdt) for
applying edgevirt's .dtbo, dtc for decompiling, dt-validate for the virtio-msg binding.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgevirt.board import Board, list_boards, load_board, parse_size
from edgevirt.devicetree.basedtb import base_dtb
from edgevirt.devicetree.compose import write_outputs
from edgevirt.devicetree.fdt import Fdt, Node, Property
from edgevirt.devicetree.irq import find_interrupt_controller, used_spis
from edgevirt.devicetree.memmap import memory_map
from edgevirt.devicetree.overlay import apply_overlay
from edgevirt.devicetree.system import _device_windows, compose_system
from edgevirt.errors import ConfigError, DeviceTreeError
from edgevirt.paths import PROJECT_ROOT
from edgevirt.spec import load_spec
from tests.helpers import MSG_HOST_SPEC, ROOT, edgevirt, flat

BOARDS = list_boards()
# Boards the composer may add interrupt-driven nodes to (a GIC and free SPIs); rpi3b's
# BCM2835 ARMCTRL takes carve-outs only (tests/test_rpi3b.py).
REAL = [
    b
    for b in BOARDS
    if not load_board(b).is_qemu and b != "qemu-virt-uboot" and load_board(b).dt.spi_range
]
BINDINGS = PROJECT_ROOT / "devicetree" / "bindings"
pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("dtc", "fdtoverlay", "qemu-system-aarch64")),
    reason="needs dtc, fdtoverlay, qemu-system-aarch64",
)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Board, Fdt, Path]]:
    tmp = tmp_path_factory.mktemp("bases")
    out = {}
    for name in BOARDS:
        board = load_board(name)
        got = base_dtb(board, tmp)
        path = tmp / f"{name}.base.dtb"
        path.write_bytes(got.fdt.to_bytes())
        out[name] = (board, got.fdt, path)
    return out


def free_window(board: Board, fdt: Fdt, size: int, skip: int = 0) -> int:
    """A CPU address no RAM and no device uses (for doorbells and new virtio-mmio nodes)."""
    mm = memory_map(board, fdt)
    windows = _device_windows(fdt)
    for cand in range(0x10000000, 0x1000000000, 0x1000000):
        if any(r.overlaps(cand, 2 * size) for r in mm.ram + mm.taken):
            continue
        if any(a < cand + 2 * size and cand < a + s for _, a, s in windows):
            continue
        if skip == 0:
            return cand
        skip -= 1
    raise AssertionError("no free window")


def spec_text(board: Board, fdt: Fdt, kind: str) -> str:
    doorbell = free_window(board, fdt, 0x2000)
    head = (
        'name = "t"\n[[vm]]\nname = "guest"\nrole = "frontend"\n'
        '[[vm]]\nname = "service"\nrole = "service"\n'
    )
    if kind == "msg+mmio":
        mmio = "" if board.is_qemu else f"address = {free_window(board, fdt, 0x2000, 1):#x}\n"
        return (
            head
            + '[[carveout]]\nname = "shared"\nsize = "32M"\n'
            + f"[msg]\ndoorbell = {doorbell:#x}\n"
            + f'[[device]]\ntype = "blk"\ntransport = "mmio"\n{mmio}'
            + '[[device]]\ntype = "rng"\ntransport = "msg"\n'
            + '[[device]]\ntype = "gpio"\ntransport = "msg"\n'
        )
    if kind == "two-pools":
        return (
            head
            + '[[carveout]]\nname = "dma"\nsize = "16M"\n'
            + '[[carveout]]\nname = "coherent"\nsize = "4M"\npool = "shared-dma-pool"\n'
            + f"[msg]\ndoorbell = {doorbell:#x}\nring_slots = 256\nslot_size = 128\n"
            + '[[device]]\ntype = "vsock"\ntransport = "msg"\ncarveout = "coherent"\n'
        )
    raise AssertionError(kind)


def dts_of(path: Path) -> str:
    return subprocess.run(
        ["dtc", "-q", "-I", "dtb", "-O", "dts", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


@pytest.mark.parametrize("kind", ["msg+mmio", "two-pools"])
@pytest.mark.parametrize("board_name", [b for b in BOARDS if load_board(b).dt.spi_range])
def test_applied_equals_fdtoverlay_for_every_board(
    bases: dict[str, tuple[Board, Fdt, Path]], board_name: str, kind: str, tmp_path: Path
) -> None:
    board, base, base_path = bases[board_name]
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text(spec_text(board, base, kind))
    plan = compose_system(board, base, load_spec(spec_file))
    assert set(plan.overlays) == {"guest", "service"}
    for vm, ov in plan.overlays.items():
        files = write_outputs(base, ov, tmp_path, vm)
        oracle = tmp_path / f"{vm}.oracle.dtb"
        subprocess.run(
            ["fdtoverlay", "-i", str(base_path), "-o", str(oracle), str(files["dtbo"])],
            check=True,
            capture_output=True,
        )
        assert Fdt.from_file(oracle).same_as(Fdt.from_file(files["dtb"])) or (
            dts_of(oracle) == dts_of(files["dtb"])
        )
        # The readable .dts compiles with dtc -@ to the same overlay as the .dtbo.
        recompiled = subprocess.run(
            ["dtc", "-q", "-@", "-I", "dts", "-O", "dtb", str(files["dts"])],
            capture_output=True,
            check=True,
        ).stdout
        assert Fdt.from_bytes(recompiled).same_as(Fdt.from_file(files["dtbo"]))
        applied = Fdt.from_file(files["dtb"])
        # Every region the VM's overlay defines is a label later overlays can use.
        symbols = applied.get("/__symbols__")
        wanted = [p.label for p in plan.placed if vm == "service" or p.vm == vm]
        assert wanted and all(symbols.get(label) is not None for label in wanted)
        if vm == "guest":
            pools = [n for _, n in applied.walk() if n.get("compatible") is not None]
            compat = {n.prop("compatible").value for n in pools}
            assert b"restricted-dma-pool\0" in compat
            assert b"edgevirt,virtio-msg\0" in compat
    # Every placement lies inside RAM and the ring sits at the top of its carve-out.
    mm = memory_map(board, base)
    for p in plan.placed:
        assert mm.ram_containing(p.base, p.size) is not None
        assert not mm.conflicts(p.base, p.size), p


def test_virtio_msg_nodes_pass_dt_validate(
    bases: dict[str, tuple[Board, Fdt, Path]], tmp_path: Path
) -> None:
    dtv = Path(sys.executable).parent / "dt-validate"
    if not dtv.exists():
        pytest.skip("dt-validate not installed")
    board, base, _ = bases["renesas-salvator-xs"]
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text(spec_text(board, base, "msg+mmio"))
    plan = compose_system(board, base, load_spec(spec_file))
    good = [write_outputs(base, ov, tmp_path, vm)["dtb"] for vm, ov in plan.overlays.items()]

    def validate(path: Path) -> str:
        r = subprocess.run(
            [str(dtv), "-l", "edgevirt", "-s", str(BINDINGS), str(path)],
            capture_output=True,
            text=True,
        )
        return r.stdout + r.stderr

    for path in good:
        assert "edgevirt" not in validate(path), validate(path)
    # The binding bites: a wrong role and an odd slot size are reported.
    applied = Fdt.from_file(good[0])
    node = next(n for _, n in applied.walk() if n.name.startswith("virtio-msg@"))
    node.set(Property.from_string("edgevirt,role", "sideways"))
    node.set(Property.from_u32("edgevirt,slot-size", 65))
    bad = tmp_path / "bad.dtb"
    applied.write(bad)
    report = validate(bad)
    assert "'sideways' is not one of" in report and "not a multiple of 8" in report


@pytest.mark.parametrize("board_name", REAL)
def test_board_profile_matches_its_upstream_dtb(
    bases: dict[str, tuple[Board, Fdt, Path]], board_name: str
) -> None:
    board, base, _ = bases[board_name]
    assert board.console is not None and base.find(board.console.uart) is not None
    gic = find_interrupt_controller(base, board.dt.interrupt_controller)
    assert gic.is_gic and gic.label  # built with -@: overlays may reference it by label
    used = used_spis(base, gic)
    assert board.dt.spi_range is not None
    lo, hi = board.dt.spi_range
    assert not set(range(lo, hi + 1)) & set(used), "spi_range collides with the DTB"
    mm = memory_map(board, base)  # also checks the load windows do not overlap each other
    # U-Boot boards: every load window in RAM and clear of reserved memory (a fastboot
    # board's ABL chooses its own addresses).
    assert (board.bootloader is not None) == (board.boot.chain == "u-boot")
    for ld in board.bootloader.loads if board.bootloader else ():
        assert mm.ram_containing(ld.address, ld.size), ld
        assert not [r for r in mm.taken if r.kind != "load" and r.overlaps(ld.address, ld.size)]


def test_auto_placement_is_highest_free_and_reported(
    bases: dict[str, tuple[Board, Fdt, Path]], tmp_path: Path
) -> None:
    board, base, _ = bases["ti-j721e-evm"]
    spec = tmp_path / "s.toml"
    spec.write_text('[[carveout]]\nsize = "64M"\n')
    plan = compose_system(board, base, load_spec(spec))
    (p,) = plan.placed
    # J721E's top RAM range is 2 GiB at 0x8_8000_0000: the carve-out is its last 64 MiB.
    assert (p.base, p.auto) == (0x880000000 + 0x80000000 - 0x4000000, True)
    assert plan.to_json()["placed"][0]["placement"] == "auto"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size_mb=st.sampled_from([1, 2, 4, 8, 16, 64, 128]),
    slot=st.integers(0, 1023),
    devices=st.integers(0, 8),
    align=st.sampled_from(["4K", "64K", "2M"]),
)
def test_property_fixed_or_auto_placements(
    qemu_base: tuple[Board, Fdt], size_mb: int, slot: int, devices: int, align: str
) -> None:
    """Random placements inside the 512 MiB of QEMU RAM: either composed (then inside
    RAM, aligned, applied tree has one pool at that address and `devices` users) or refused
    with a DeviceTreeError naming the carve-out in hex."""
    board, base = qemu_base
    size = size_mb << 20
    addr = 0x40000000 + slot * (512 << 20) // 1024
    tmp = Path(f"/tmp/edgevirt-hyp-{slot}-{size_mb}-{devices}.toml")
    dev = '[[device]]\ntype = "blk"\ntransport = "mmio"\n' * devices
    for placement in (f"{addr:#x}", '"auto"'):
        tmp.write_text(
            f'[[carveout]]\nsize = "{size_mb}M"\nalign = "{align}"\nplacement = {placement}\n' + dev
        )
        try:
            plan = compose_system(board, base, load_spec(tmp))
        except ConfigError as e:  # refused by the spec schema, naming the key
            assert size % parse_size(align, "") or addr % parse_size(align, ""), e
            assert "align" in str(e)
            continue
        except DeviceTreeError as e:
            assert placement != '"auto"', e  # 512 MiB of RAM: auto always finds room
            assert f"{addr:#x}" in str(e) and "size" in str(e)
            continue
        (p,) = plan.placed
        mm = memory_map(board, base)
        assert mm.ram_containing(p.base, p.size) and p.base % 0x1000 == 0
        applied = apply_overlay(base, plan.overlays["guest"])
        pool = applied.get(f"/reserved-memory/restricted-dma@{p.base:x}")
        users = [n for _, n in applied.walk() if n.get("memory-region") is not None]
        assert pool.phandle is not None and len(users) == devices
    tmp.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def qemu_base(bases: dict[str, tuple[Board, Fdt, Path]]) -> tuple[Board, Fdt]:
    board, base, _ = bases["qemu-virt"]
    return board, base


# -- the checks of the issue, each a clear error -----------------------------------------


def compose_err(board: Board, base: Fdt, text: str, tmp_path: Path) -> str:
    spec = tmp_path / "s.toml"
    spec.write_text(text)
    with pytest.raises((DeviceTreeError, ConfigError)) as exc:
        compose_system(board, base, load_spec(spec))
    return str(exc.value)


@pytest.mark.parametrize(
    "board_name,text,expect",
    [
        (
            "qemu-virt",
            "size='8M'\nplacement=0x80000000",
            "0x80000000-0x807fffff (size 0x800000) is not inside one RAM range",
        ),
        (
            "qemu-virt",
            "size='8M'\nplacement=0x40100000",
            "placement: 0x40100000 is not aligned to align 0x200000",
        ),
        ("qemu-virt", "size='64K'\nalign='4K'\nplacement=0x40000000", "needs at least 0x40000"),
        ("rpi4b", "size='2M'\nplacement=0x0", "overlaps memreserve /memreserve/ 0x0-0xfff"),
        (
            "ti-j721e-evm",
            "size='2M'\nplacement=0xa0000000",
            "overlaps reserved /reserved-memory/r5f-dma-memory@a0000000",
        ),
        (
            "renesas-salvator-xs",
            "size='2M'\nplacement=0x48000000",
            "overlaps load fdt_addr_r 0x48000000-0x4807ffff (size 0x80000)",
        ),
        (
            "rpi3b",
            "size='2M'\nplacement=0x2600000",
            "overlaps load fdt_addr_r 0x2600000-0x26fffff",
        ),
    ],
)
def test_carveout_checks(
    bases: dict[str, tuple[Board, Fdt, Path]],
    board_name: str,
    text: str,
    expect: str,
    tmp_path: Path,
) -> None:
    board, base, _ = bases[board_name]
    assert expect in compose_err(board, base, f"[[carveout]]\n{text}\n", tmp_path)


def test_two_carveouts_must_not_overlap(qemu_base: tuple[Board, Fdt], tmp_path: Path) -> None:
    text = (
        "[[carveout]]\nname='a'\nsize='8M'\nplacement=0x50000000\n"
        "[[carveout]]\nname='b'\nsize='8M'\nplacement=0x50400000\nalign='4K'\n"
    )
    msg = compose_err(*qemu_base, text, tmp_path)
    assert "carve-out 'b' 0x50400000-0x50bfffff" in msg and "edgevirt_a" in msg


def test_virtio_mmio_node_qemu_does_not_create(
    qemu_base: tuple[Board, Fdt], tmp_path: Path
) -> None:
    base = "[[carveout]]\nsize='8M'\n[[device]]\ntype='blk'\ntransport='mmio'\n"
    msg = compose_err(*qemu_base, base + "node='/virtio_mmio@a004000'\n", tmp_path)
    assert "the QEMU machine does not create such virtio,mmio node" in msg
    msg = compose_err(*qemu_base, base + "address=0x0c000000\n", tmp_path)
    assert "creates no virtio-mmio node there" in msg


def test_duplicate_interrupt_in_spi_range(
    bases: dict[str, tuple[Board, Fdt, Path]], tmp_path: Path
) -> None:
    board, base, _ = bases["renesas-salvator-xs"]
    clash = Board(**{**board.__dict__, "dt": type(board.dt)(board.dt.source, None, (220, 230))})
    text = spec_text(board, base, "msg+mmio")
    msg = compose_err(clash, base, text, tmp_path)
    assert "SPI 220" in msg and "duplicate interrupt" in msg


def test_phandle_collision_and_cells_mismatch(qemu_base: tuple[Board, Fdt], tmp_path: Path) -> None:
    board, base = qemu_base
    text = "[[carveout]]\nsize='8M'\n"
    twin = base.copy()
    twin.root.add_child(Node("twin", {"phandle": Property.from_u32("phandle", 0x8002)}))
    assert "phandle collision: 0x8002" in compose_err(board, twin, text, tmp_path)
    odd = base.copy()
    rmem = odd.root.add_child(Node("reserved-memory"))
    rmem.set(Property.from_u32("#address-cells", 1))
    rmem.set(Property.from_u32("#size-cells", 1))
    rmem.set(Property.empty("ranges"))
    assert "cells mismatch" in compose_err(board, odd, text, tmp_path)
    badreg = base.copy()
    badreg.get("/pl011@9000000").set(Property("reg", b"\0" * 12))
    assert "reg is 12 bytes, not a multiple of 16" in compose_err(board, badreg, text, tmp_path)


# -- the CLI -----------------------------------------------------------------------------


def test_cli_compose_spec_show_diff(tmp_path: Path) -> None:
    spec = PROJECT_ROOT / "devicetree" / "specs" / "qemu-virt-msg.toml"
    r = edgevirt(
        "dt", "compose", "--board", "qemu-virt", "--spec", str(spec), "-o", str(tmp_path), "--json"
    )
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["placed"][0] == {
        "kind": "carveout",
        "name": "shared",
        "label": "edgevirt_shared",
        "base": "0x5c000000",
        "size": "0x4000000",
        "vm": "guest",
        "pool": "restricted-dma-pool",
        "placement": "auto",
        "pool_size": "0x3ffd000",
    }
    assert info["mmio"] == {"0": "/virtio_mmio@a003e00", "1": "/virtio_mmio@a003c00"}
    r = edgevirt("dt", "diff", str(tmp_path / "base.dtb"), str(tmp_path / "guest.dtb"), "--json")
    changes = {c["path"]: c for c in json.loads(r.stdout)}
    assert changes["/virtio_mmio@a003e00"]["added"]["memory-region"].startswith("<0x")
    assert changes["/virtio-msg@c000000"]["change"] == "added"
    assert changes["/reserved-memory/restricted-dma@5c000000"]["added"]["reg"] == (
        "<0x0 0x5c000000 0x0 0x3ffd000>"
    )
    r = edgevirt("dt", "show", "--board", "qemu-virt", "--spec", str(spec), "--json")
    kinds = {(x["kind"], x["base"]) for x in json.loads(r.stdout)["regions"]}
    assert ("carveout", "0x5c000000") in kinds and ("msg-ring", "0x5fffd000") in kinds
    r = edgevirt("dt", "show", "--board", "renesas-salvator-xs")
    assert r.returncode == 0 and "kernel_addr_r" in r.stdout and "0x48080000" in r.stdout


@pytest.mark.parametrize(
    "blob,expect",
    [
        (b"\xde\xad\xbe\xef" + b"\0" * 60, "expected"),
        (b"", "expected magic"),
        (b"half", "truncated"),
        (b"loop", "expected a token"),
    ],
)
def test_cli_refuses_malformed_dtb_without_traceback(
    tmp_path: Path, blob: bytes, expect: str, bases: dict[str, tuple[Board, Fdt, Path]]
) -> None:
    real = bases["qemu-virt"][1].to_bytes()
    if blob == b"half":
        blob = real[: len(real) // 2]
    elif blob == b"loop":  # FDT_END replaced by a bogus token: the walk must stop, not spin
        blob = (
            real[: real.rfind(b"\0\0\0\x09")]
            + b"\0\0\0\x07"
            + real[real.rfind(b"\0\0\0\x09") + 4 :]
        )
    bad = tmp_path / "bad.dtb"
    bad.write_bytes(blob)
    board = tmp_path / "b.toml"
    board.write_text(
        f'name = "b"\n[dt]\nsource = "file:{bad}"\n[[ram]]\nbase = 0x40000000\nsize = "1G"\n'
        '[console]\nkernel = "ttyAMA0"\n'
    )
    spec = tmp_path / "s.toml"
    spec.write_text("[[carveout]]\nsize='8M'\n")
    for args in (
        ("dt", "compose", "--board", str(board), "--spec", str(spec), "-o", str(tmp_path / "o")),
        ("dt", "show", "--board", str(board)),
        ("dt", "diff", str(bad), str(bad)),
    ):
        r = edgevirt(*args)
        assert r.returncode == 1, (args, r.stderr)
        assert "Traceback" not in r.stderr and str(bad) in r.stderr.replace("\n", "")
        assert expect in r.stderr.replace("\n", " ")


# -- virtio-msg over ivshmem-pci: the node the guest module binds to ---------------------

#: What images/modules/virtio_msg reads (vmsg_virtio.c probe) plus the binding's mode and
#: pool: the node `up --transport msg` hands the guest.
MODULE_NODE = {
    "compatible": b"edgevirt,virtio-msg\0",
    "edgevirt,doorbell": b"ivshmem-pci\0",
    "memory-region-names": b"dma\0",
    "dma-coherent": b"",
    "edgevirt,role": b"frontend\0",
    "edgevirt,device-count": (2).to_bytes(4, "big"),
    "edgevirt,device-ids": (2).to_bytes(4, "big") + (4).to_bytes(4, "big"),
    "edgevirt,ring-slots": (64).to_bytes(4, "big"),
    "edgevirt,slot-size": (264).to_bytes(4, "big"),
}


def test_ivshmem_pci_bus_node_is_what_the_module_expects(
    qemu_base: tuple[Board, Fdt], tmp_path: Path
) -> None:
    board, base = qemu_base
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text(MSG_HOST_SPEC)
    plan = compose_system(board, base, load_spec(spec_file))
    assert plan.msg_nodes == {"guest": "/virtio-msg"}
    assert not plan.spis  # no doorbell interrupt: MSI-X of the PCI device
    # No ring off the carve-out: the pool is exactly the QEMU carve-out node.
    (co,) = plan.placed
    assert (co.base, co.node_size) == (0x5C000000, 64 << 20)
    applied = Fdt.from_file(write_outputs(base, plan.overlays["guest"], tmp_path, "guest")["dtb"])
    node = applied.get("/virtio-msg")
    props = {name: p.value for name, p in node.properties.items()}
    pool = applied.get("/reserved-memory/restricted-dma@5c000000")
    assert props.pop("memory-region") == pool.prop("phandle").value
    assert props == MODULE_NODE
    assert not [n for _, n in applied.walk() if n.name.startswith("virtio-msg-ring")]


def test_ivshmem_pci_node_passes_dt_validate_and_the_binding_bites(
    qemu_base: tuple[Board, Fdt], tmp_path: Path
) -> None:
    dtv = Path(sys.executable).parent / "dt-validate"
    if not dtv.exists():
        pytest.skip("dt-validate not installed")
    board, base = qemu_base
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text(
        MSG_HOST_SPEC + '[[vm]]\nname = "guest"\nrole = "frontend"\n'
        '[[vm]]\nname = "service"\nrole = "service"\n'
    )
    plan = compose_system(board, base, load_spec(spec_file))
    dtbs = {vm: write_outputs(base, ov, tmp_path, vm)["dtb"] for vm, ov in plan.overlays.items()}
    assert set(dtbs) == {"guest", "service"}

    def validate(path: Path) -> str:
        r = subprocess.run(
            [str(dtv), "-l", "edgevirt", "-s", str(BINDINGS), str(path)],
            capture_output=True,
            text=True,
        )
        return r.stdout + r.stderr

    for path in dtbs.values():
        assert "edgevirt" not in validate(path), validate(path)
    # ivshmem-pci forbids a doorbell window and a second (msg-ring) region ...
    applied = Fdt.from_file(dtbs["guest"])
    node = applied.get("/virtio-msg")
    node.set(Property.from_u32("reg", 0xC000000, 0x1000))
    node.set(Property.from_strings("memory-region-names", ["dma", "msg-ring"]))
    bad = tmp_path / "bad.dtb"
    applied.write(bad)
    report = validate(bad)
    assert "reg" in report and "memory-region-names" in report, report
    # ... and the mmio mode still needs them.
    node = Fdt.from_file(dtbs["guest"])
    node.get("/virtio-msg").remove("edgevirt,doorbell")
    node.write(bad)
    report = validate(bad)
    assert "'reg' is a required property" in report, report
    assert "'interrupts' is a required property" in report, report


@pytest.mark.parametrize("board_name", REAL)
def test_real_board_composes_with_its_example_spec(board_name: str, tmp_path: Path) -> None:
    """`dt compose --board <real board>` without --spec uses devicetree/specs/<board>.toml,
    says so, and gives per-VM DTBs that fdtoverlay reproduces from the base and overlay."""
    from edgevirt.paths import board_example_spec

    assert board_example_spec(board_name) is not None, f"no example spec for {board_name}"
    out = tmp_path / "dt"
    r = edgevirt("dt", "compose", "--board", board_name, "-o", str(out), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "example spec" in flat(r.stderr) and f"{board_name}.toml" in flat(r.stderr)
    plan = json.loads((out / "plan.json").read_text())
    kinds = {p["kind"] for p in plan["placed"]}
    assert {"carveout", "msg-ring"} <= kinds, kinds
    doorbell = load_spec(board_example_spec(board_name)).msg.doorbell
    assert f"virtio-msg@{doorbell:x} {{" in dts_of(out / "guest.dtb")
    for vm in ("guest", "service"):
        oracle = tmp_path / f"{vm}-oracle.dtb"
        subprocess.run(
            ["fdtoverlay", "-i", str(out / "base.dtb"), "-o", str(oracle), str(out / f"{vm}.dtbo")],
            check=True,
        )
        assert dts_of(oracle) == dts_of(out / f"{vm}.dtb"), vm


def test_real_board_without_an_example_spec_says_what_it_needs(tmp_path: Path) -> None:
    text = (ROOT / "boards/rpi4b.toml").read_text().replace('name = "rpi4b"', 'name = "myboard"')
    board = tmp_path / "myboard.toml"
    board.write_text(text)
    r = edgevirt("dt", "compose", "--board", str(board), "-o", str(tmp_path / "o"))
    assert r.returncode == 4, r.stderr
    msg = flat(r.stderr)
    assert "myboard is a real board" in msg and "--spec" in msg and "doorbell" in msg
    assert "QEMU" not in msg and "Traceback" not in msg
