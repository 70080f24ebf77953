"""`edgevirt backend`: run the virtio back-end, show its statistics."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click
from rich.table import Table

from edgevirt.cli.common import EXIT_CONFIG, err, fail, out
from edgevirt.errors import ConfigError, EdgevirtError, SetupError


@click.group()
def backend() -> None:
    """The virtio back-end (service-VM role)."""


@backend.command("run")
@click.option(
    "--device",
    "devices",
    multiple=True,
    required=True,
    help="blk:path=FILE[,readonly=on][,queues=N][,seg_max=N][,discard=off][,serial=S] "
    "or rng; repeatable.",
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
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the sockets as one JSON line when ready and the final stats as JSON on exit.",
)
def backend_run(
    devices: tuple[str, ...], socket_dir: Path, stats: Path | None, log_level: str, as_json: bool
) -> None:
    """Serve virtio devices over vhost-user until SIGTERM/SIGINT (then drain and exit).

    \b
    Example:
      edgevirt backend run --device blk:path=disk.img,queues=2 --device rng --socket-dir /tmp/ev
      qemu-system-aarch64 ... -chardev socket,id=c0,path=/tmp/ev/0-blk.sock,reconnect=1 \\
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
    if as_json:
        ready = {"event": "ready", "sockets": {ep.device.name: str(ep.socket) for ep in eps}}
        click.echo(json.dumps(ready), nl=True)
    else:
        for ep in eps:
            err.print(f"[cyan]serving[/] {ep.device.name} on {ep.socket}")
    final = svc.run()
    if as_json:
        click.echo(json.dumps(final, indent=2))
    else:
        render(final)


@backend.command("status")
@click.argument("stats_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the stats file's JSON as is.")
def backend_status(stats_file: Path, as_json: bool) -> None:
    """Show a running (or finished) back-end's statistics from its --stats file."""
    try:
        data = json.loads(stats_file.read_text())
    except OSError as e:
        fail(SetupError(f"{stats_file}: {e.strerror or e}"))
    except ValueError as e:
        err.print(f"[bold red]error:[/] {stats_file} is not a stats file: {e}")
        raise SystemExit(EXIT_CONFIG) from None
    if not isinstance(data, dict) or not isinstance(data.get("devices"), list):
        fail(ConfigError(f"{stats_file}: no 'devices' list: not an edgevirt stats file"))
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        render(data)


def render(stats: dict) -> None:
    """Devices, then one row per queue: what an operator looks at first."""
    state = "running" if stats.get("running") else "stopped"
    dev_table = Table(title=f"back-end pid {stats.get('pid')} ({state}, ring {stats.get('ring')})")
    for col in ("device", "connected", "mapped", "requests", "in B", "out B", "errors",
                "refused", "broken"):  # fmt: skip
        dev_table.add_column(col, justify="right" if col not in ("device", "broken") else "left")
    q_table = Table(title="queues")
    for col in ("device", "queue", "size", "started", "served", "kicks", "calls",
                "resubmitted", "avail idx", "inflight", "broken"):  # fmt: skip
        q_table.add_column(col, justify="left" if col in ("device", "broken") else "right")
    for d in stats.get("devices", []):
        dev_table.add_row(
            d.get("device", "?"),
            "yes" if d.get("connected") else "no",
            f"{d.get('mapped_bytes', 0):#x}",
            str(d.get("requests", 0)),
            str(d.get("bytes_read", 0)),
            str(d.get("bytes_written", 0)),
            str(d.get("errors", 0)),
            str(d.get("refused", 0)),
            "; ".join(d.get("broken", [])) or "-",
            style="red" if d.get("broken") or d.get("refused") else None,
        )
        for q in d.get("queues", []):
            q_table.add_row(
                d.get("device", "?"),
                str(q.get("index")),
                str(q.get("size")),
                "yes" if q.get("started") else "no",
                str(q.get("served", 0)),
                str(q.get("kicks", 0)),
                str(q.get("notifications", 0)),
                str(q.get("resubmitted", 0)),
                str(q.get("last_avail_idx", 0)),
                "yes" if q.get("inflight_tracking") else "no",
                q.get("broken") or "-",
                style="red" if q.get("broken") else None,
            )
    out.print(dev_table)
    out.print(q_table)
