"""`edgevirt servicevm`: the back-end in an aarch64 service VM (two VMs, shared memory only)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgevirt.cli.common import RichReporter, fail, out
from edgevirt.cli.up import FAULTS, run_up
from edgevirt.errors import EdgevirtError


@click.group()
def servicevm() -> None:
    """Two VMs: the front-end's virtio devices served from a service VM over virtio-msg."""


@servicevm.command("up")
@click.option("--board", default="qemu-virt", show_default=True)
@click.option("--build-dir", type=click.Path(path_type=Path), default=None,
              help="Output directory [default: out/<board>-servicevm].")  # fmt: skip
@click.option("--fault", type=click.Choice(FAULTS), default=None,
              help="Inject a service-VM failure (see `edgevirt up --help`).")  # fmt: skip
@click.option("--boot-timeout", type=float, default=180.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def servicevm_up(
    board: str, build_dir: Path | None, fault: str | None, boot_timeout: float, as_json: bool
) -> None:
    """Alias of `edgevirt up --transport msg --backend service-vm`."""
    from edgevirt.up import UpOptions

    opts = UpOptions(
        build_dir or Path("out") / f"{board}-servicevm", board=board, transport="msg",
        backend="service-vm", boot_timeout=boot_timeout, fault=fault,
    )  # fmt: skip
    run_up(opts, as_json)


@servicevm.command("image")
@click.option("--json", "as_json", is_flag=True)
def servicevm_image(as_json: bool) -> None:
    """Build (or find cached) the service-VM image with the default two-VM configuration."""
    from edgevirt.board import load_board
    from edgevirt.servicevm.image import build_service_image
    from edgevirt.servicevm.up import peer_config

    rep = RichReporter(quiet=as_json)
    try:
        cfg = peer_config(load_board("qemu-virt"))
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
