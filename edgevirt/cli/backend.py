"""`edgevirt backend`: run the virtio back-end."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from edgevirt.cli.common import err, fail
from edgevirt.errors import EdgevirtError, SetupError

# -- backend -------------------------------------------------------------------------------


@click.group()
def backend() -> None:
    """The virtio back-end (service-VM role)."""


@backend.command("run")
@click.option(
    "--device",
    "devices",
    multiple=True,
    required=True,
    help="blk:path=FILE[,readonly=on][,queues=N] or rng; repeatable.",
)
@click.option(
    "--socket-dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory for the vhost-user sockets (<index>-<kind>.sock).",
)
@click.option(
    "--stats",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Keep a JSON stats file up to date here.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def backend_run(
    devices: tuple[str, ...], socket_dir: Path, stats: Path | None, log_level: str
) -> None:
    """Serve virtio devices over vhost-user until SIGTERM/SIGINT.

    \b
    Example:
      edgevirt backend run --device blk:path=disk.img --device rng --socket-dir /tmp/ev
      qemu-system-aarch64 ... -chardev socket,id=c0,path=/tmp/ev/0-blk.sock \\
          -device vhost-user-blk,chardev=c0,iommu_platform=on
    """
    from edgevirt.backend.devices import parse_device
    from edgevirt.backend.service import BackendService, Endpoint
    from edgevirt.up import backend_socket

    logging.getLogger().setLevel(log_level.upper())
    try:
        socket_dir.mkdir(parents=True, exist_ok=True)
        eps = []
        for i, spec in enumerate(devices):
            dev = parse_device(spec)
            eps.append(Endpoint(dev, backend_socket(socket_dir, i, dev.name)))
        svc = BackendService(eps, stats)
    except EdgevirtError as e:
        fail(e)
    except OSError as e:
        fail(SetupError(f"socket directory {socket_dir}: {e.strerror or e}"))
    for ep in eps:
        err.print(f"[cyan]serving[/] {ep.device.name} on {ep.socket}")
    svc.run()
