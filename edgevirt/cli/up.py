"""`edgevirt up`: the whole path on a board, with a summary table."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from edgevirt.cli.common import EXIT_FAILED, EXIT_OK, RichReporter, err, fail, out
from edgevirt.errors import EdgevirtError

# -- up ------------------------------------------------------------------------------------


def memory_map(result: Any) -> Table:
    base, size = result.carveout
    t = Table(title="guest memory map", show_edge=False)
    t.add_column("range")
    t.add_column("size", justify="right")
    t.add_column("what")
    from edgevirt.board import load_board

    board = load_board(result.board)
    ram = board.qemu.ram_base
    t.add_row(f"{ram:#010x}–{base:#010x}", f"{(base - ram) >> 20} MiB", "private RAM (NUMA node 0)")
    t.add_row(
        f"{base:#010x}–{base + size:#010x}",
        f"{size >> 20} MiB",
        "[green]carve-out[/]: shared file, restricted-dma-pool"
        if result.restrict
        else "shared file, [red]no restricted pool[/]",
    )
    return t


@click.command()
@click.option("--board", default="qemu-virt", show_default=True, help="Board profile name or file.")
@click.option(
    "--build-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where artefacts and logs go [default: out/<board>].",
)
@click.option("--no-restrict", is_flag=True, help="Leave out the restricted-dma-pool overlay.")
@click.option(
    "--boot-timeout",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds to wait for the guest agent.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def up(
    board: str, build_dir: Path | None, no_restrict: bool, boot_timeout: float, as_json: bool
) -> None:
    """Build, boot and test a carve-out-restricted guest on QEMU virt.

    \b
    Steps: compose the DT overlay, build (or reuse) kernel and initramfs, start the
    back-end (vhost-user-blk + vhost-user-rng), boot QEMU, run the smoke suite over the
    serial console, power off and print a summary. Logs stay in the build dir.
    """
    from edgevirt.up import UpOptions
    from edgevirt.up import up as do_up

    opts = UpOptions(
        build_dir=build_dir or Path("out") / board,
        board=board,
        restrict=not no_restrict,
        boot_timeout=boot_timeout,
    )
    try:
        result = do_up(opts, RichReporter(quiet=as_json))
    except EdgevirtError as e:
        fail(e)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        t = Table(
            title=f"edgevirt up — {result.board}"
            + ("" if result.restrict else " (restriction off)")
        )
        t.add_column("check")
        t.add_column("result")
        t.add_column("detail", overflow="fold")
        for c in result.checks:
            t.add_row(c.name, "[green]PASS[/]" if c.ok else "[red]FAIL[/]", c.detail)
        out.print(t)
        out.print(memory_map(result))
        if result.error:
            err.print(f"[bold red]error:[/] {result.error}")
        verdict = "[bold green]all checks passed[/]" if result.ok else "[bold red]FAILED[/]"
        out.print(f"{verdict} in {result.seconds:.1f}s — logs in {opts.build_dir}")
    sys.exit(EXIT_OK if result.ok else EXIT_FAILED)
