"""`edgevirt console --board B`: an interactive, logged session on the board's console."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edgevirt.cli.common import EXIT_OK, err, interruptible, stop_on_sigterm
from edgevirt.cli.lab import place_options
from edgevirt.errors import ConfigError


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
@place_options
@click.option(
    "--power-on", is_flag=True, help="With --place: switch the board on after connecting."
)
@click.pass_context
def console(
    ctx: click.Context,
    board: str,
    url: str | None,
    log_path: Path | None,
    place: str | None,
    coordinator: str | None,
    wait: float,
    power_on: bool,
) -> None:
    """Attach to a board's serial console (Ctrl-] leaves); everything is logged.

    \b
    A QEMU board has no console until it runs: use `edgevirt deploy -i --board B`.
    Examples:
      edgevirt console --board rpi4b
      edgevirt console --board rpi4b --url rfc2217://lab-host:3000
      edgevirt console --place rack1-rpi4 --coordinator lab:20408 --power-on

    \b
    With --place the place is acquired for the session and released when you leave
    (a board this command switched on is switched off again).
    """
    from edgevirt.board import load_board
    from edgevirt.console.expect import Console
    from edgevirt.console.interact import interact

    stop_on_sigterm()
    with interruptible():
        if place is not None:
            _place_console(ctx, place, coordinator, wait, board, log_path, power_on)
            sys.exit(EXIT_OK)
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
    sys.exit(EXIT_OK)


def _place_console(
    ctx: click.Context,
    place: str,
    coordinator: str | None,
    wait: float,
    board: str,
    log_path: Path | None,
    power_on: bool,
) -> None:
    """Hold the place for an interactive session on its serial port (power untouched
    unless --power-on)."""
    from edgevirt.console.expect import Console
    from edgevirt.console.interact import interact
    from edgevirt.lab import coordinator_address
    from edgevirt.lab.client import LabClient
    from edgevirt.lab.run import hold_places

    del ctx, board  # the console needs no board profile: the place gives URL and speed
    with LabClient(coordinator_address(coordinator)) as client:
        with hold_places(client, place, 1, wait=wait) as [session]:
            acq = session.acquired
            assert acq is not None and session.power is not None
            path = log_path or Path("out") / f"lab-{session.name}" / "console.log"
            path.parent.mkdir(parents=True, exist_ok=True)
            con = Console.open(
                acq.console_url,
                log_path=path,
                baudrate=acq.baudrate,
                name=f"place {session.name} console",
            )
            try:
                err.print(
                    f"[dim]place {session.name}: connected to {acq.console_url}; "
                    f"Ctrl-] to leave; log {path}[/]"
                )
                if power_on:
                    session.power.on()
                interact(con)
            finally:
                con.close()
