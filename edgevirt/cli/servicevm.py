"""`edgevirt servicevm`: the back-end in an aarch64 service VM (two VMs, shared memory only)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from edgevirt.cli.common import EXIT_FAILED, RichReporter, fail, out
from edgevirt.errors import EdgevirtError


@click.group()
def servicevm() -> None:
    """Two VMs: the front-end's virtio devices served from a service VM over virtio-msg."""


@servicevm.command("up")
@click.option("--board", default="qemu-virt", show_default=True)
@click.option("--build-dir", type=click.Path(path_type=Path), default=None,
              help="Output directory [default: out/<board>-servicevm].")  # fmt: skip
@click.option("--fault", type=click.Choice(["late-service", "backend-crash"]), default=None,
              help="Inject a service-VM failure: the run must fail naming that VM.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True)
def servicevm_up(board: str, build_dir: Path | None, fault: str | None, as_json: bool) -> None:
    """Build both images, boot service VM then front-end, smoke suite + health checks."""
    from edgevirt.servicevm.up import up_service_vm

    rep = RichReporter(quiet=as_json)
    try:
        result = up_service_vm(
            build_dir or Path("out") / f"{board}-servicevm", board=board, fault=fault, reporter=rep
        )
    except EdgevirtError as e:
        fail(e)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        table = Table(title=f"{board}: back-end in the service VM")
        for col in ("check", "ok", "detail"):
            table.add_column(col)
        for c in result.checks:
            table.add_row(c.name, "[green]yes[/]" if c.ok else "[red]NO[/]", c.detail)
        out.print(table)
        if result.error:
            out.print(f"[red]error:[/] {result.error}")
        verdict = "[green]PASS[/]" if result.ok else f"[red]FAIL[/] ({result.failed_vm} VM)"
        out.print(f"{verdict} in {result.seconds:.1f}s; timings {result.timings}")
    if not result.ok:
        raise SystemExit(EXIT_FAILED)


@servicevm.command("image")
@click.option("--json", "as_json", is_flag=True)
def servicevm_image(as_json: bool) -> None:
    """Build (or find cached) the service-VM image with the default two-VM configuration."""
    from edgevirt.board import load_board
    from edgevirt.servicevm import up as svup
    from edgevirt.servicevm.image import build_service_image
    from edgevirt.servicevm.peer import PeerConfig

    rep = RichReporter(quiet=as_json)
    try:
        s = load_board("qemu-virt").qemu
        cfg = PeerConfig(svup.CARVEOUT_PCI, s.carveout_base, svup.MSG_PCI, svup.FRONTEND_ID,
                         carveout_size=s.carveout, devices=["blk:path=/dev/vda", "rng"],
                         stats=svup.STATS)  # fmt: skip
        image = build_service_image(cfg, rep)
    except EdgevirtError as e:
        fail(e)
    info = {"kernel": str(image.kernel.image), "rootfs": str(image.rootfs.path),
            **image.rootfs.manifest}  # fmt: skip
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        out.print(f"rootfs {info['rootfs']} ({info['bytes']} bytes, "
                          f"{len(info['packages'])} packages, extension "
                          f"{info['extension']['machine']})")  # fmt: skip
