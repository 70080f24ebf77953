"""`edgevirt dt`: device-tree overlays for a board."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from edgevirt.cli.common import fail, out
from edgevirt.errors import EdgevirtError

# -- dt ------------------------------------------------------------------------------------


@click.group()
def dt() -> None:
    """Device trees: the carve-out overlay for a board."""


@dt.command("compose")
@click.option("--board", default="qemu-virt", show_default=True)
@click.option(
    "-o",
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Output directory for guest.dtbo, guest.dts and guest.dtb.",
)
@click.option(
    "--devices",
    type=int,
    default=2,
    show_default=True,
    help="How many virtio-mmio devices the guest uses (QEMU fills slots from the top).",
)
@click.option("--json", "as_json", is_flag=True)
def dt_compose(board: str, out_dir: Path, devices: int, as_json: bool) -> None:
    """Compose the restricted-dma-pool overlay for BOARD and apply it.

    \b
    Example:
      edgevirt dt compose --board qemu-virt -o out/dt
      fdtoverlay -i out/dt/qemu-virt.raw.dtb -o check.dtb out/dt/guest.dtbo   # same result
    """
    import os
    import secrets

    from edgevirt.board import load_board
    from edgevirt.deploy.qemu import QemuConfig, virtio_mmio_slots
    from edgevirt.up import compose_dtb

    shm = Path("/dev/shm") / f"edgevirt-dt-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        b = load_board(board)
        out_dir.mkdir(parents=True, exist_ok=True)
        nodes = [f"/virtio_mmio@{a:x}" for a in virtio_mmio_slots(devices)]
        dtb = compose_dtb(b, QemuConfig(b.qemu, shm), out_dir, True, nodes)
    except EdgevirtError as e:
        fail(e)
    finally:
        shm.unlink(missing_ok=True)
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
