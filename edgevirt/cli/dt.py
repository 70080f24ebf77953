"""`edgevirt dt`: board device trees, the carve-out / virtio overlays, views of both."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from edgevirt.cli.common import err, fail, out, out_dir_option
from edgevirt.errors import EdgevirtError

_COLOURS = {
    "ram": "green",
    "memreserve": "red",
    "reserved": "red",
    "load": "yellow",
    "carveout": "magenta",
    "msg-ring": "cyan",
    "doorbell": "blue",
    "mmio": "blue",
}


@click.group()
def dt() -> None:
    """Device trees: base DTBs, carve-out and virtio overlays, memory maps, diffs.

    \b
    Examples:
      edgevirt dt fetch --all                         # build + cache every board's DTB
      edgevirt dt show --board renesas-salvator-xs    # memory map (--json for scripts)
      edgevirt dt compose --board qemu-virt --spec devicetree/specs/qemu-virt-msg.toml -o out/dt
      edgevirt dt diff out/dt/base.dtb out/dt/guest.dtb
    """


@dt.command("compose")
@click.option("--board", default="qemu-virt", show_default=True)
@click.option(
    "--spec",
    "spec_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="System spec (VMs, carve-outs, devices). Default: QEMU boards get the `up` "
    "carve-out overlay, real boards their example devicetree/specs/<board>.toml.",
)
@out_dir_option("Output directory (<vm>.dtbo/.dts/.dtb per VM, base.dtb, plan.json).")
@click.option(
    "--devices",
    type=int,
    default=2,
    show_default=True,
    help="Without --spec: how many virtio-mmio devices the guest uses (QEMU fills from the top).",
)
@click.option("--json", "as_json", is_flag=True)
def dt_compose(
    board: str, spec_path: Path | None, out_dir: Path, devices: int, as_json: bool
) -> None:
    """Compose the overlays for BOARD (and SPEC), write them and the applied DTBs.

    \b
    Examples:
      edgevirt dt compose --board qemu-virt -o out/dt
      edgevirt dt compose --board renesas-salvator-xs -o out/rcar   # its example spec
      fdtoverlay -i out/dt/qemu-virt.raw.dtb -o check.dtb out/dt/guest.dtbo   # same result
    """
    from edgevirt.board import load_board
    from edgevirt.deploy.machine import carveout_dtb
    from edgevirt.errors import ConfigError
    from edgevirt.paths import board_example_spec, specs_dir

    if spec_path is not None:
        _compose_spec(board, spec_path, out_dir, as_json)
        return
    try:
        b = load_board(board)
        if not b.is_qemu:
            # A real board has no QEMU machine to derive VMs from: its example spec says
            # which VMs, carve-out and devices, and the user is told it was used.
            example = board_example_spec(b.name)
            if example is None:
                raise ConfigError(
                    f"{b.path}: {b.name} is a real board: `dt compose` needs a system spec "
                    "(--spec FILE) naming its VMs, carve-outs and devices, and "
                    f"{specs_dir()} has no {b.name}.toml example",
                    hint=f"copy one of {specs_dir()}/*.toml, set its [msg] doorbell to a "
                    "window free on this board, and pass it with --spec",
                )
            if not as_json:
                err.print(f"[cyan]▶[/] no --spec: using {b.name}'s example spec {example}")
            _compose_spec(board, example, out_dir, as_json)
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        dtb, nodes = carveout_dtb(b, out_dir, devices)
    except EdgevirtError as e:
        fail(e)
    files = {k: str(out_dir / f"guest.{k}") for k in ("dtbo", "dts", "dtb")}
    info = {
        "board": b.name,
        "carveout": {"base": hex(b.qemu.carveout_base), "size": b.qemu.carveout},
        "nodes": nodes,
        "files": files,
        "size": dtb.stat().st_size,
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    t = Table(title=f"carve-out overlay for {b.name}")
    t.add_column("what")
    t.add_column("value")
    t.add_row("carve-out", f"{b.qemu.carveout_base:#x} + {b.qemu.carveout >> 20} MiB")
    t.add_row("memory-region on", ", ".join(nodes))
    for k, v in files.items():
        t.add_row(k, v)
    out.print(t)


def _compose_spec(board: str, spec_path: Path, out_dir: Path, as_json: bool) -> None:
    from edgevirt.board import load_board
    from edgevirt.devicetree.basedtb import base_dtb
    from edgevirt.devicetree.compose import write_outputs
    from edgevirt.devicetree.system import compose_system
    from edgevirt.spec import load_spec

    try:
        b = load_board(board)
        spec = load_spec(spec_path)
        out_dir.mkdir(parents=True, exist_ok=True)
        base = base_dtb(b, out_dir)
        plan = compose_system(b, base.fdt, spec)
        (out_dir / "base.dtb").write_bytes(base.fdt.to_bytes())
        files = {
            vm: {k: str(v) for k, v in write_outputs(base.fdt, ov, out_dir, vm).items()}
            for vm, ov in plan.overlays.items()
        }
    except EdgevirtError as e:
        fail(e)
    info = plan.to_json() | {"base": str(out_dir / "base.dtb"), "origin": base.origin}
    info["files"] = files
    (out_dir / "plan.json").write_text(json.dumps(info, indent=2) + "\n")
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    t = Table(title=f"{spec.name} on {b.name} ({base.origin})")
    for col in ("region", "base", "size", "VM", "placement"):
        t.add_column(col)
    for p in plan.placed:
        what = f"{p.kind} {p.name}" + (f" ({p.pool})" if p.pool else "")
        if p.pool_size:
            what += f", pool {p.pool_size:#x}"
        t.add_row(what, f"{p.base:#x}", f"{p.size:#x}", p.vm, p.to_json()["placement"])
    out.print(t)
    for idx, path in plan.mmio.items():
        out.print(f"  device {idx} (mmio) → {path}")
    for path, spi in plan.spis.items():
        out.print(f"  {path}: SPI {spi}")
    for vm, fs in files.items():
        out.print(f"  {vm}: " + ", ".join(fs.values()))


@dt.command("fetch")
@click.option("--board", "boards", multiple=True, help="Board name (repeatable).")
@click.option("--all", "all_boards", is_flag=True, help="Every shipped board.")
@click.option("--refresh", is_flag=True, help="Rebuild even if cached.")
@click.option("--json", "as_json", is_flag=True)
def dt_fetch(boards: tuple[str, ...], all_boards: bool, refresh: bool, as_json: bool) -> None:
    """Get each board's base DTB as a user would (QEMU dump, kernel tree, file) and cache it."""
    from edgevirt.board import list_boards, load_board
    from edgevirt.devicetree.basedtb import base_dtb

    names = list_boards() if all_boards else list(boards)
    if not names:
        raise click.UsageError("name a --board or pass --all")
    rows = []
    try:
        for name in names:
            b = load_board(name)
            got = base_dtb(b, refresh=refresh)
            rows.append({"board": b.name, "path": str(got.path), "origin": got.origin})
    except EdgevirtError as e:
        fail(e)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    t = Table(title="base DTBs")
    for col in ("board", "origin", "path"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["board"], r["origin"], r["path"])
    out.print(t)


@dt.command("show")
@click.option("--board", default="qemu-virt", show_default=True)
@click.option("--spec", "spec_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def dt_show(board: str, spec_path: Path | None, as_json: bool) -> None:
    """Draw the board's memory map: RAM, reserved regions, load addresses (and with
    --spec, where its carve-outs and message rings go)."""
    from edgevirt.board import load_board
    from edgevirt.devicetree.basedtb import base_dtb
    from edgevirt.devicetree.memmap import memory_map
    from edgevirt.devicetree.system import compose_system
    from edgevirt.spec import load_spec

    try:
        b = load_board(board)
        base = base_dtb(b)
        if spec_path is not None:
            mm = compose_system(b, base.fdt, load_spec(spec_path)).memory
        else:
            mm = memory_map(b, base.fdt)
    except EdgevirtError as e:
        fail(e)
    data: dict[str, Any] = mm.to_json() | {"origin": base.origin}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    t = Table(title=f"memory map of {b.name} ({base.origin})")
    for col in ("kind", "start", "end", "size", "name", "detail"):
        t.add_column(col, no_wrap=col in ("start", "end", "size"))
    for r in mm.regions:
        colour = _COLOURS.get(r.kind, "white")
        t.add_row(
            Text(r.kind, style=colour),
            f"{r.base:#x}",
            f"{r.end - 1:#x}",
            _human(r.size),
            r.name,
            r.detail,
        )
    out.print(t)
    for ram in sorted(mm.ram, key=lambda r: r.base):
        out.print(_bar(ram, mm.regions))
    if mm.dynamic:
        out.print("dynamic reserved (no fixed address): " + ", ".join(mm.dynamic))


def _human(size: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size:#x}"


def _bar(ram: Any, regions: list[Any], width: int = 64) -> Text:
    """One line per RAM range: each cell coloured by what occupies most of it."""
    text = Text(f"{ram.base:#012x} ")
    step = ram.size / width
    for i in range(width):
        lo, hi = ram.base + int(i * step), ram.base + int((i + 1) * step)
        best, cover = "ram", 0
        for r in regions:
            if r.kind == "ram":
                continue
            c = min(hi, r.end) - max(lo, r.base)
            if c > cover:
                best, cover = r.kind, c
        text.append("█" if best != "ram" else "░", style=_COLOURS.get(best, "white"))
    text.append(f" {ram.end - 1:#x} ({_human(ram.size)})")
    return text


@dt.command("diff")
@click.argument("base_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("final_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def dt_diff(base_path: Path, final_path: Path, as_json: bool) -> None:
    """Show what changed from BASE to FINAL (two DTBs), node by node."""
    from edgevirt.devicetree.diff import diff_trees
    from edgevirt.devicetree.fdt import Fdt
    from edgevirt.errors import DeviceTreeError

    trees = []
    for p in (base_path, final_path):
        try:
            trees.append(Fdt.from_file(p))
        except DeviceTreeError as e:
            fail(DeviceTreeError(f"{p}: {e}"))
    changes = diff_trees(trees[0], trees[1])
    if as_json:
        click.echo(json.dumps([c.to_json() for c in changes], indent=2))
        return
    if not changes:
        out.print("no differences")
        return
    marks = {"added": ("+", "green"), "removed": ("-", "red"), "modified": ("~", "yellow")}
    for c in changes:
        mark, colour = marks[c.change]
        out.print(Text(f"{mark} {c.path}", style=f"bold {colour}"))
        for name, value in c.added.items():
            out.print(Text(f"    + {name} = {value}", style="green"))
        for name, value in c.removed.items():
            out.print(Text(f"    - {name} = {value}", style="red"))
        for name, (old, new) in c.changed.items():
            out.print(Text(f"    ~ {name}: {old} → {new}", style="yellow"))


@dt.command("xen")
@click.option(
    "--build-dir",
    type=click.Path(path_type=Path),
    default=Path("out") / "qemu-virt-xen",
    show_default=True,
    help="Where the images, DTBs and the boot script go.",
)
@click.option("--uboot", is_flag=True, help="Also write tftp/boot.cmd, boot.scr and the files.")
@click.option("--json", "as_json", is_flag=True)
def dt_xen(build_dir: Path, uboot: bool, as_json: bool) -> None:
    """Compose the Xen dom0less host DTB and each domU's partial DTB; draw the host's map
    and each domain's.

    \b
    Builds (or reuses) the front-end image, the service domU's rootfs and Debian's Xen,
    dumps the base DTB of QEMU virt at EL2, and writes dt/host.dtb, dt/<domain>.dtb and
    dt/memory-map.json. With --uboot, the boot script a real board runs.

    \b
    Examples:
      edgevirt dt xen
      edgevirt dt xen --uboot --build-dir /srv/tftp/xen
    """
    from edgevirt.cli.common import RichReporter
    from edgevirt.platforms.xen_machine import XenMachine
    from edgevirt.platforms.xen_uboot import write_boot_script

    try:
        m = XenMachine(build_dir.resolve())
        images = m.prepare(RichReporter(quiet=as_json))
        assert images.dt is not None
        script = write_boot_script(images.dt, images.xen.image, m.build / "tftp") if uboot else None
    except EdgevirtError as e:
        fail(e)
    xdt = images.dt
    data = {"host_dtb": str(xdt.host_dtb), "partials": {k: str(v) for k, v in xdt.partials.items()},
            "host": xdt.host_map, "domains": xdt.domain_maps,
            "boot_script": str(script.scr) if script else None}  # fmt: skip
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for title, rows in [("host (what Xen sees)", xdt.host_map),
                        *((f"domain {d} (what Xen maps for it)", r)
                          for d, r in xdt.domain_maps.items())]:  # fmt: skip
        t = Table(title=title)
        for col in ("start", "end", "size", "what"):
            t.add_column(col, no_wrap=col != "what")
        for r in rows:
            t.add_row(f"{r['base']:#x}", f"{r['base'] + r['size'] - 1:#x}", _human(r["size"]),
                      r["what"])  # fmt: skip
        out.print(t)
    out.print(f"host DTB {xdt.host_dtb}" + (f"; boot script {script.scr}" if script else ""))
