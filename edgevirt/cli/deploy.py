"""`edgevirt deploy --board B [--image DIR]`: bring a target to its shell."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from edgevirt.cli.common import EXIT_OK, RichReporter, err, interruptible, out, stop_on_sigterm
from edgevirt.cli.lab import place_board, place_options
from edgevirt.cli.test import board_options, deploy_options

if TYPE_CHECKING:
    from edgevirt.deploy.target import Target


@click.command()
@board_options
@click.option(
    "--state",
    type=click.Choice(["bootloader", "kernel", "shell"]),
    default="shell",
    show_default=True,
    help="Stop in this state of the boot strategy.",
)
@click.option(
    "--interactive",
    "-i",
    is_flag=True,
    help="Then attach the console (Ctrl-] ends, and powers a QEMU target off).",
)
@place_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.pass_context
def deploy(
    ctx: click.Context,
    board: str,
    build_dir: Path | None,
    image: Path | None,
    load: str | None,
    boot_timeout: float,
    transport: str,
    state: str,
    interactive: bool,
    place: str | None,
    coordinator: str | None,
    wait: float,
    as_json: bool,
) -> None:
    """Deploy the images to a board and boot it to STATE (default: its shell).

    \b
    QEMU boards are powered off when the command ends (use -i to work on them);
    a real board keeps running with what was deployed.
    Examples:
      edgevirt deploy --board qemu-virt-uboot --load ymodem
      edgevirt deploy --board rpi4b --image out/rpi4b/image --state bootloader -i
      edgevirt deploy --board rpi3b -i            # QEMU raspi3b + the Pi's U-Boot, SD card
      edgevirt deploy --board rpi3b --load ymodem # no card: everything over the console
      edgevirt deploy --board qcom-sa8155p-adp    # fastboot boot of an Android boot image
      edgevirt deploy --transport msg -i      # qemu-virt, devices over virtio-msg
      edgevirt deploy --place rack1-rpi4 --image out/rpi4b/image -i   # a labgrid place

    \b
    With --place the place is held while the command runs; on leaving, its board is
    powered off (through the place's power resource) and the place released.
    """
    import time

    from edgevirt.board import load_board
    from edgevirt.deploy.target import Target

    stop_on_sigterm()
    t0 = time.monotonic()
    with interruptible("target powered off" + (", place released" if place else "")):
        if place is not None:
            from edgevirt.cli.lab import lab_target

            opts = deploy_options(
                build_dir or Path("out") / "lab-deploy", image, load, boot_timeout, transport
            )
            with lab_target(
                place,
                coordinator,
                wait,
                place_board(ctx, board),
                opts,
                RichReporter(quiet=as_json),
            ) as (session, target):
                _deploy(target, state, transport, interactive, as_json, t0, place=session.name)
        else:
            b = load_board(board)
            build = build_dir or Path("out") / b.name
            target = Target(
                b,
                deploy_options(build, image, load, boot_timeout, transport),
                RichReporter(quiet=as_json),
            )
            try:
                _deploy(target, state, transport, interactive, as_json, t0)
            finally:
                if target.machine is not None or target.model is not None:
                    target.close()
    sys.exit(EXIT_OK)


def _deploy(
    target: Target,
    state: str,
    transport: str,
    interactive: bool,
    as_json: bool,
    t0: float,
    place: str | None = None,
) -> None:
    import time

    from edgevirt.console.interact import interact

    b = target.board
    target.prepare()
    target.transition(state)
    seconds = time.monotonic() - t0
    result = {
        "board": b.name,
        "state": state,
        "strategy": target.strategy.name,
        "load": target.load if target.uboot else "direct",
        "transport": transport,
        "seconds": seconds,
        "console_log": str(target.build / "console.log"),
    }
    if place is not None:
        result["place"] = place
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        where = f" on place [bold]{place}[/]" if place else ""
        out.print(
            f"[bold green]{b.name}[/]{where} is in state [bold]{state}[/] "
            f"({target.strategy.name}, {seconds:.1f}s) — log {result['console_log']}"
        )
    if interactive:
        err.print("[dim]console attached; Ctrl-] to leave[/]")
        interact(target.console)
