"""`edgevirt tftp serve DIR`: edgevirt's own read-only TFTP server, a bar per transfer."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import click
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from edgevirt.cli.common import EXIT_OK, err, fail, out, stop_on_sigterm
from edgevirt.errors import EdgevirtError


@click.group()
def tftp() -> None:
    """TFTP for boards whose U-Boot loads images over the network."""


@tftp.command()
@click.argument(
    "directory", type=click.Path(exists=True, file_okay=False, path_type=Path), metavar="DIR"
)
@click.option("--port", type=int, default=69, show_default=True, help="UDP port (0: any free).")
@click.option(
    "--bind",
    "host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (0.0.0.0 for boards on the LAN).",
)
@click.option("--timeout", type=float, default=1.0, show_default=True, help="Retransmit after.")
@click.option("--retries", type=int, default=5, show_default=True, help="Give up after.")
@click.option("--max-transfers", type=int, default=8, show_default=True, help="At once.")
def serve(
    directory: Path, port: int, host: str, timeout: float, retries: int, max_transfers: int
) -> None:
    """Serve the files under DIR read-only over TFTP until Ctrl-C.

    \b
    Options blksize, tsize, timeout and windowsize are negotiated; write requests and names
    outside DIR are refused with a TFTP error.
    Examples:
      edgevirt tftp serve out/rpi4b/image --bind 0.0.0.0      # U-Boot: tftpboot ... Image
      edgevirt tftp serve /srv/tftp --port 6969
    """
    from edgevirt.deploy.tftp import State, TftpServer, Transfer

    stop_on_sigterm()
    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        console=err,
    )
    tasks: dict[int, TaskID] = {}
    lock = threading.Lock()

    def progress(t: Transfer) -> None:
        with lock:
            if t.id not in tasks:
                what = f"#{t.id} {t.filename} → {t.peer[0]}:{t.peer[1]}"
                tasks[t.id] = bars.add_task(what, total=t.size)
            task = tasks[t.id]
        bars.update(task, completed=t.sent)
        if t.state is State.DONE:
            bars.update(task, total=t.sent)
            bars.console.print(
                f"[green]✓[/] {t.filename} → {t.peer[0]}:{t.peer[1]}: {t.sent} bytes "
                f"in {t.seconds:.2f}s (blksize {t.blksize}, window {t.windowsize})"
            )
        elif t.state is State.FAILED:
            bars.console.print(
                f"[red]✗[/] {t.filename} → {t.peer[0]}:{t.peer[1]}: {t.error} after {t.sent} bytes"
            )
        if t.state is not State.RUNNING:
            bars.remove_task(task)

    try:
        server = TftpServer(
            directory,
            host,
            port,
            timeout=timeout,
            retries=retries,
            max_transfers=max_transfers,
            progress=progress,
        )
    except EdgevirtError as e:
        fail(e)
    h, p = server.address
    out.print(f"serving {server.root} on tftp://{h}:{p}/ (Ctrl-C stops)", highlight=False)
    sys.stdout.flush()
    with bars:
        try:
            server.start()
            server.wait()
        except KeyboardInterrupt:
            pass  # Ctrl-C (or SIGTERM) is how a server is meant to stop
        finally:
            server.close()
    sys.exit(EXIT_OK)
