"""`edgevirt console --board B`: an interactive, logged session on the board's console."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edgevirt.cli.common import EXIT_OK, err, fail
from edgevirt.cli.test import EXIT_INTERRUPTED, stop_on_sigterm
from edgevirt.errors import ConfigError, EdgevirtError


@click.command()
@click.option("--board", default="qemu-virt", show_default=True, help="Board profile name or file.")
@click.option("--url", default=None, help="Console URL instead of the board's [console] url.")
@click.option(
    "--log",
    "log_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Session log [default: out/<board>/console.log].",
)
def console(board: str, url: str | None, log_path: Path | None) -> None:
    """Attach to a board's serial console (Ctrl-] leaves); everything is logged.

    \b
    A QEMU board has no console until it runs: use `edgevirt deploy -i --board B`.
    Examples:
      edgevirt console --board rpi4b
      edgevirt console --board rpi4b --url rfc2217://lab-host:3000
    """
    from edgevirt.board import load_board
    from edgevirt.console.expect import Console
    from edgevirt.console.interact import interact

    stop_on_sigterm()
    try:
        b = load_board(board)
        target_url = url or (b.console.url if b.console else None)
        if not target_url:
            raise ConfigError(
                f"{b.where('console')}: no url for {b.name}'s console",
                hint="QEMU boards: `edgevirt deploy -i --board " + b.name + "`",
            )
        path = log_path or Path("out") / b.name / "console.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        baud = b.console.baudrate if b.console else 115200
        con = Console.open(target_url, log_path=path, baudrate=baud, name=f"{b.name} console")
        err.print(f"[dim]connected to {target_url}; Ctrl-] to leave; log {path}[/]")
        try:
            interact(con)
        finally:
            con.close()
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    except EdgevirtError as e:
        fail(e)
    sys.exit(EXIT_OK)
