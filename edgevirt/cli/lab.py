"""`edgevirt lab places|export` and the `--place` options of test, deploy and console.

labgrid is an optional extra: nothing here imports it until a lab command runs.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from edgevirt.cli.common import EXIT_OK, fail, out
from edgevirt.errors import EdgevirtError

COORDINATOR_HELP = "labgrid coordinator HOST[:PORT] [default: $LG_COORDINATOR]."


def place_options(f):  # type: ignore[no-untyped-def]
    """``--place/--coordinator/--wait`` for commands that drive a board."""
    f = click.option(
        "--wait",
        type=click.FloatRange(0),
        default=0.0,
        show_default=True,
        help="With --place: seconds to queue (coordinator reservation) for a busy place; "
        "0 fails at once.",
    )(f)
    f = click.option("--coordinator", default=None, metavar="HOST:PORT", help=COORDINATOR_HELP)(f)
    return click.option(
        "--place",
        default=None,
        help="Run on a labgrid place: a name, a glob, or tags such as 'board=qemu-virt' "
        "(the board profile comes from the place's board tag unless --board is given).",
    )(f)


def place_board(ctx: click.Context, board: str) -> str | None:
    """``--board`` if the command line gave it, else None: the place's board tag decides."""
    given = ctx.get_parameter_source("board") is not click.core.ParameterSource.DEFAULT
    return board if given else None


def run_lab_test(  # type: ignore[no-untyped-def]
    place: str,
    coordinator: str | None,
    wait: float,
    parallel: int,
    board: str | None,
    suites,
    opts,
    reporter,
    on_step,
):
    """`edgevirt test --place`: hold the places, run, release; (title, runs)."""
    from edgevirt.lab import LabError, coordinator_address
    from edgevirt.lab.client import LabClient
    from edgevirt.lab.run import hold_places, run_on_places

    address = coordinator_address(coordinator)
    runs = None
    try:
        with LabClient(address) as client:
            with hold_places(client, place, parallel, wait=wait, reporter=reporter) as sessions:
                runs = run_on_places(
                    client,
                    sessions,
                    suites,
                    opts,
                    board=board,
                    reporter=reporter,
                    on_step=on_step,
                )
    except LabError as e:
        if runs is None:
            raise
        # The suites ran but a place could not be released: report both.
        why = str(e) + (f" (hint: {e.hint})" if e.hint else "")
        for run in runs:
            run.error = f"{run.error}; {why}" if run.error else why
    return f"{place} @ {address}", runs


@contextlib.contextmanager
def lab_target(  # type: ignore[no-untyped-def]
    place: str, coordinator: str | None, wait: float, board: str | None, opts, reporter
):
    """`deploy/console --place`: (PlaceSession, Target) held for the with-block."""
    from edgevirt.lab import coordinator_address
    from edgevirt.lab.client import LabClient
    from edgevirt.lab.run import place_target

    with LabClient(coordinator_address(coordinator)) as client:
        with place_target(client, place, opts, board=board, wait=wait, reporter=reporter) as held:
            yield held


@click.group()
def lab() -> None:
    """Board farms: labgrid places (needs `pip install 'edgevirt[labgrid]'`).

    \b
    Examples:
      edgevirt lab places --coordinator lab:20408
      edgevirt lab places --json
      edgevirt lab export --board rpi4b --serial /dev/serial/by-id/usb-FTDI-if00-port0 \\
          --power 'simplerest,http://pdu:9999/relay/{index}/{value},3' -o rpi4b.yaml
      edgevirt test smoke --place 'board=rpi4b' --image out/rpi4b/image
    """


@lab.command()
@click.option("--coordinator", default=None, metavar="HOST:PORT", help=COORDINATOR_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the places as JSON on stdout.")
def places(coordinator: str | None, as_json: bool) -> None:
    """List the coordinator's places: free, acquired (by whom) or reserved.

    \b
    Examples:
      edgevirt lab places --coordinator 127.0.0.1:20408
      LG_COORDINATOR=lab:20408 edgevirt lab places --json
    """
    from edgevirt.lab import coordinator_address
    from edgevirt.lab.client import LabClient

    try:
        with LabClient(coordinator_address(coordinator)) as client:
            rows = []
            for p in client.places():
                res = client.resources(p.name)
                rows.append(
                    p.to_json()
                    | {
                        "resources": [
                            {"path": r.path, "class": r.cls, "avail": r.avail} for r in res
                        ]
                    }
                )
            address = client.address
    except EdgevirtError as e:
        fail(e)
    if as_json:
        click.echo(json.dumps({"coordinator": address, "places": rows}, indent=2))
        sys.exit(EXIT_OK)
    t = Table(title=f"labgrid places at {address}")
    for col in ("place", "state", "by", "board", "tags", "resources"):
        t.add_column(col, overflow="fold")
    colour = {"free": "green", "acquired": "red", "reserved": "yellow"}
    for r in rows:
        avail = sum(1 for x in r["resources"] if x["avail"])
        classes = ", ".join(sorted({x["class"] for x in r["resources"]})) or "-"
        t.add_row(
            r["name"],
            f"[{colour[r['state']]}]{r['state']}[/]",
            escape(r["acquired_by"] or r["reservation"] or ""),
            escape(r["tags"].get("board", "")),
            escape(",".join(f"{k}={v}" for k, v in r["tags"].items() if k != "board")),
            f"{avail}/{len(r['resources'])} ({escape(classes)})",
        )
    out.print(t)
    sys.exit(EXIT_OK)


@lab.command()
@click.option("--board", required=True, help="Board profile name or file.")
@click.option("--serial", required=True, help="The board's UART on the lab host (/dev/…).")
@click.option(
    "--power",
    default=None,
    metavar="MODEL,HOST[,INDEX]",
    help="NetworkPowerPort: a labgrid power model, its host/URL, the outlet index.",
)
@click.option("--group", default=None, help="Resource group in the exporter [default: board].")
@click.option("--place", "place_name", default=None, help="Place name [default: the group].")
@click.option("--exporter", default="LABHOST", show_default=True, help="Exporter --name.")
@click.option("--coordinator", default=None, metavar="HOST:PORT", help=COORDINATOR_HELP)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the exporter YAML here [default: stdout].",
)
@click.option("--json", "as_json", is_flag=True, help="Config, commands and hints as JSON.")
def export(
    board: str,
    serial: str,
    power: str | None,
    group: str | None,
    place_name: str | None,
    exporter: str,
    coordinator: str | None,
    output: Path | None,
    as_json: bool,
) -> None:
    """Write the labgrid exporter YAML for BOARD wired to a lab host, and the commands that
    make it a place edgevirt can use.

    \b
    Examples:
      edgevirt lab export --board rpi4b --serial /dev/ttyUSB0 \\
          --power 'simplerest,http://127.0.0.1:9999/relay/{index}/{value},0' -o exports.yaml
      edgevirt lab export --board renesas-salvator-xs --serial /dev/ttyUSB1 \\
          --power 'netio,pdu.lab,4' --exporter rack3 --json
    """
    import os

    from edgevirt.board import load_board
    from edgevirt.lab.export import (
        exporter_config,
        exporter_yaml,
        hints,
        parse_power,
        place_commands,
    )

    try:
        b = load_board(board)
        cfg = exporter_config(b, serial, parse_power(power) if power else None, group)
        grp = next(iter(cfg))
        command = "edgevirt lab export " + " ".join(sys.argv[3:]) if len(sys.argv) > 3 else ""
        text = exporter_yaml(b, cfg, command or f"edgevirt lab export --board {board}")
        coord = coordinator or os.environ.get("LG_COORDINATOR") or "COORDINATOR:20408"
        cmds = place_commands(
            coord, exporter, grp, place_name or grp, b, str(output or "exports.yaml")
        )
        notes = hints(b, cfg)
    except EdgevirtError as e:
        fail(e)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "exporter": cfg,
                    "file": str(output) if output else None,
                    "commands": cmds,
                    "hints": notes,
                },
                indent=2,
            )
        )
        sys.exit(EXIT_OK)
    if output is None:
        click.echo(text, nl=False)
    else:
        out.print(f"[green]wrote[/] {output}")
    err_lines = ["", "then:"] + [f"  {c}" for c in cmds] + [""] + [f"note: {n}" for n in notes]
    click.echo("\n".join(err_lines), err=True)
    sys.exit(EXIT_OK)
