"""`edgevirt backend gpio`: drive and read the lines of a running back-end's simulated bank."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from edgevirt.cli.common import EXIT_FAILED, err, fail, out
from edgevirt.errors import EdgevirtError

CTL = click.option(
    "--ctl",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The bank's control socket: the gpio device's ctl= option.",
)
JSON = click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON.")


@click.group()
def gpio() -> None:
    """The simulated GPIO bank behind a running back-end's virtio-gpio device.

    \b
    Examples:
      edgevirt backend run --device gpio:lines=led+button,ctl=/tmp/ev/gpio.sock \\
          --socket-dir /tmp/ev
      qemu-system-aarch64 ... -chardev socket,id=g0,path=/tmp/ev/0-gpio.sock \\
          -device vhost-user-gpio-device,chardev=g0,iommu_platform=on
      edgevirt backend gpio set --ctl /tmp/ev/gpio.sock button 1   # guest reads 1 (+ edge IRQ*)
      edgevirt backend gpio get --ctl /tmp/ev/gpio.sock led        # what the guest drives
      edgevirt backend gpio list --ctl /tmp/ev/gpio.sock
    \b
    * over virtio-msg; QEMU 7.2's vhost-user-gpio-device passes the guest no interrupts.
    """


def _ask(ctl: Path, request: dict, as_json: bool) -> dict:
    from edgevirt.backend.devices.gpiosim import control

    try:
        reply = control(ctl, request)
    except EdgevirtError as e:
        fail(e)
    if as_json:
        click.echo(json.dumps(reply))
    if not reply.get("ok"):
        if not as_json:
            err.print(f"[bold red]error:[/] {escape(str(reply.get('error')))}")
        sys.exit(EXIT_FAILED)
    return reply


@gpio.command("get")
@CTL
@JSON
@click.argument("line")
def gpio_get(ctl: Path, line: str, as_json: bool) -> None:
    """Print LINE's value (a name or a number): the guest's for an output, else the
    level the outside drives."""
    reply = _ask(ctl, {"op": "get", "line": line}, as_json)
    if not as_json:
        click.echo(reply["value"])


@gpio.command("set")
@CTL
@JSON
@click.argument("line")
@click.argument("value", type=click.Choice(["0", "1"]))
def gpio_set(ctl: Path, line: str, value: str, as_json: bool) -> None:
    """Drive LINE to VALUE from outside (an input for the guest: edges raise its interrupts)."""
    reply = _ask(ctl, {"op": "set", "line": line, "value": int(value)}, as_json)
    if not as_json:
        err.print(f"{reply['name']} (line {reply['line']}) = {reply['value']}")


@gpio.command("list")
@CTL
@JSON
def gpio_list(ctl: Path, as_json: bool) -> None:
    """Every line: number, name, direction the guest gave it, value on the wire."""
    reply = _ask(ctl, {"op": "list"}, as_json)
    if as_json:
        return
    table = Table(title=f"gpio bank on {ctl}")
    for col in ("line", "name", "direction", "value"):
        table.add_column(col, justify="right" if col in ("line", "value") else "left")
    for ln in reply["lines"]:
        table.add_row(str(ln["line"]), ln["name"], ln["direction"], str(ln["value"]))
    out.print(table)
