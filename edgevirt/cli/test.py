"""`edgevirt test SUITE --board B`: boot, run YAML suites, table + JUnit XML."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.table import Table

from edgevirt.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    RichReporter,
    err,
    interruptible,
    out,
    stop_on_sigterm,
)
from edgevirt.cli.lab import place_board, place_options
from edgevirt.cli.up import TRANSPORTS
from edgevirt.deploy.target import DeployOptions


def deploy_options(
    build_dir: Path, image: Path | None, load: str | None, boot_timeout: float, transport: str
) -> DeployOptions:

    def ask(text: str) -> None:
        click.pause(f"[manual power] {text} — press any key")

    return DeployOptions(
        build_dir,
        image_dir=image,
        load=load,
        boot_timeout=boot_timeout,
        ask=ask,
        transport=transport,
    )


def board_options(f):  # type: ignore[no-untyped-def]
    f = click.option(
        "--boot-timeout",
        type=float,
        default=120.0,
        show_default=True,
        help="Seconds from power-on to the shell.",
    )(f)
    f = click.option(
        "--transport",
        type=click.Choice(TRANSPORTS),
        default="vhost-user",
        show_default=True,
        help="QEMU boards: vhost-user devices, or virtio-msg over ivshmem-doorbell (the "
        "guest's virtio_msg module on the composer's bus node).",
    )(f)
    f = click.option(
        "--load",
        type=click.Choice(["tftp", "fit", "ymodem", "sdcard"]),
        default=None,
        help="U-Boot boards: how images get to the board: TFTP files or FIT, ymodem over "
        "the console, or an SD card edgevirt writes (U-Boot runs its boot.scr) "
        "[default: [tftp], else [sdcard], else ymodem].",
    )(f)
    f = click.option(
        "--image",
        type=click.Path(path_type=Path, file_okay=False, exists=True),
        default=None,
        help="Directory with Image, initramfs.cpio.gz (guest.dtb, guest.itb for real boards).",
    )(f)
    f = click.option(
        "--build-dir",
        type=click.Path(path_type=Path),
        default=None,
        help="Artefacts and logs [default: out/<board>].",
    )(f)
    return click.option(
        "--board", default="qemu-virt", show_default=True, help="Board profile name or file."
    )(f)


@click.command("test")
@click.argument("suites", nargs=-1, required=True)
@board_options
@click.option(
    "--parallel",
    type=click.IntRange(1, 16),
    default=1,
    show_default=True,
    help="Run on N QEMU targets at once (own ports and build dir each), or on N places "
    "matching --place (one JUnit file).",
)
@click.option(
    "--junit",
    type=click.Path(path_type=Path),
    default=None,
    help="JUnit XML path [default: <build-dir>/junit.xml].",
)
@click.option(
    "--ser2net",
    is_flag=True,
    help="QEMU boards: reach the console through ser2net over rfc2217:// (as in a lab).",
)
@place_options
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON on stdout.")
@click.pass_context
def test(
    ctx: click.Context,
    suites: tuple[str, ...],
    board: str,
    build_dir: Path | None,
    image: Path | None,
    load: str | None,
    boot_timeout: float,
    transport: str,
    parallel: int,
    junit: Path | None,
    ser2net: bool,
    place: str | None,
    coordinator: str | None,
    wait: float,
    as_json: bool,
) -> None:
    """Boot the board and run test SUITES (a shipped name such as smoke, or a .yaml file).

    \b
    Examples:
      edgevirt test smoke                                   # qemu-virt, direct boot
      edgevirt test boot smoke --board qemu-virt-uboot --load fit
      edgevirt test carveout boot --board rpi3b             # SD card on QEMU raspi3b
      edgevirt test smoke --transport msg                   # devices over virtio-msg
      edgevirt test my-suite.yaml --parallel 3 --junit out/junit.xml
      edgevirt test smoke --place rack1-rpi4 --coordinator lab:20408   # a labgrid place
      edgevirt test smoke --place 'board=qemu-virt' --parallel 2 --wait 300
    """
    from edgevirt.board import load_board
    from edgevirt.suite.junit import write_junit
    from edgevirt.suite.model import load_suite
    from edgevirt.suite.session import run_parallel

    stop_on_sigterm()
    stopped = "every target was powered off" + (", every place released" if place else "")
    with interruptible(stopped):
        loaded = [load_suite(s) for s in suites]
        reporter = RichReporter(quiet=as_json)

        def on_step(target: str, s: object) -> None:
            if not as_json:
                ok = getattr(s, "ok", False)
                mark = "[green]✓[/]" if ok else "[red]✗[/]"
                err.print(f"  {mark} {target}: {getattr(s, 'name', '')}")

        if place is not None:
            from edgevirt.cli.lab import run_lab_test

            if ser2net:
                raise click.UsageError(
                    "--ser2net is for local QEMU boards: a place's console already comes "
                    "through its exporter's ser2net"
                )
            build = build_dir or Path("out") / "lab-test"
            opts = deploy_options(build, image, load, boot_timeout, transport)
            title, runs = run_lab_test(
                place,
                coordinator,
                wait,
                parallel,
                place_board(ctx, board),
                loaded,
                opts,
                reporter,
                on_step,
            )
        else:
            b = load_board(board)
            title = b.name
            build = build_dir or Path("out") / f"{b.name}-test"
            opts = deploy_options(build, image, load, boot_timeout, transport)
            opts.ser2net = ser2net
            runs = run_parallel(
                b,
                loaded,
                opts,
                parallel,
                reporter=reporter,
                on_step=on_step,
            )
    results = [r for run in runs for r in run.results]
    junit_path = write_junit(junit or build / "junit.xml", results)
    ok = all(run.ok for run in runs) and bool(results)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "ok": ok,
                    "junit": str(junit_path),
                    "targets": [
                        {
                            "name": r.name,
                            "build": str(r.build),
                            "boot_seconds": r.boot_seconds,
                            "error": r.error,
                            "suites": [s.to_json() for s in r.results],
                        }
                        for r in runs
                    ],
                },
                indent=2,
            )
        )
    else:
        t = Table(title=f"edgevirt test — {title}" + (f" ×{parallel}" if parallel > 1 else ""))
        for col in ("target", "suite", "step", "result", "time"):
            t.add_column(col, justify="right" if col == "time" else "left")
        t.add_column("detail", overflow="fold")
        style = {"failed": "[red]FAIL[/]", "error": "[red]ERROR[/]", "skipped": "[yellow]SKIP[/]"}
        for run in runs:
            for r in run.results:
                for s in r.steps:
                    verdict = "[green]PASS[/]" if s.ok else style.get(s.outcome, "[red]FAIL[/]")
                    t.add_row(run.name, r.suite, s.name, verdict, f"{s.seconds:.1f}s", s.detail)
        out.print(t)
        for run in runs:
            if run.error:
                err.print(f"[bold red]error:[/] {run.name}: {run.error}")
        n = sum(len(r.steps) for r in results)
        passed = sum(1 for r in results for s in r.steps if s.ok)
        verdict = "[bold green]passed[/]" if ok else "[bold red]FAILED[/]"
        out.print(f"{verdict}: {passed}/{n} steps — JUnit {junit_path}")
    sys.exit(EXIT_OK if ok else EXIT_FAILED)
