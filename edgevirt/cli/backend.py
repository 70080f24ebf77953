"""`edgevirt backend`: run the virtio back-end, show its statistics."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import click
from rich.console import Group
from rich.table import Table

from edgevirt.board import parse_address, parse_size
from edgevirt.cli.common import EXIT_CONFIG, err, fail, out
from edgevirt.cli.up import TRANSPORTS
from edgevirt.errors import ConfigError, EdgevirtError, SetupError

if TYPE_CHECKING:
    from edgevirt.backend.config import BackendSpec
    from edgevirt.backend.devices import VirtioDevice
    from edgevirt.backend.loop import Loop
    from edgevirt.backend.service import BackendService


@click.group()
def backend() -> None:
    """The virtio back-end (service-VM role)."""


@backend.command("run")
@click.option(
    "--device",
    "devices",
    multiple=True,
    help="blk:path=FILE[,readonly=on][,queues=N][,seg_max=N][,discard=off][,serial=S]"
    "[,cache=none|writeback][,aio=auto|io_uring|threads|sync] "
    "or rng; repeatable (or [[device]] tables in --spec).",
)
@click.option(
    "--spec",
    "spec_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Back-end spec (TOML): transport, devices, sockets; options given here override it.",
)
@click.option(
    "--transport",
    type=click.Choice(TRANSPORTS),
    default=None,
    help="vhost-user (one socket per device, default) or msg (a virtio-msg bus).",
)
@click.option(
    "--socket-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="vhost-user: directory for the sockets (<index>-<kind>.sock).",
)
@click.option(
    "--ivshmem-socket",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="msg: the ivshmem server socket QEMU's ivshmem-doorbell connects to.",
)
@click.option(
    "--carveout-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="msg: the guest's carve-out (QEMU memory-backend-file), the only guest memory mapped.",
)
@click.option(
    "--carveout-base",
    default=None,
    metavar="ADDR",
    help="msg: the carve-out's guest-physical address (0x5c000000).",
)
@click.option(
    "--carveout-size",
    default=None,
    metavar="SIZE",
    help="msg: bytes of the file to map (64M, 0x4000000; default: the whole file).",
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(0.0001, 10),
    default=None,
    metavar="SECONDS",
    help="msg: polling fallback, scan the message ring this often (for a driver without a "
    "doorbell; default: doorbells plus a 50 ms back-stop poll).",
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
    help="Print the endpoints as one JSON line when ready and the final stats as JSON on exit "
    "(no live view).",
)
def backend_run(
    devices: tuple[str, ...],
    spec_file: Path | None,
    transport: str | None,
    socket_dir: Path | None,
    ivshmem_socket: Path | None,
    carveout_file: Path | None,
    carveout_base: str | None,
    carveout_size: str | None,
    poll_interval: float | None,
    stats: Path | None,
    log_level: str,
    as_json: bool,
) -> None:
    """Serve virtio devices until SIGTERM/SIGINT (then drain and exit), over vhost-user
    (one socket per device) or as a virtio-msg bus (ivshmem server + the carve-out file).

    On a terminal a live table of the counters is shown while serving; the final
    statistics are printed on exit (as JSON with --json).

    \b
    Examples:
      edgevirt backend run --device blk:path=disk.img,queues=2 --device rng --socket-dir /tmp/ev
      edgevirt backend run --device blk:path=/dev/mmcblk0p3,cache=none --socket-dir /tmp/ev
      qemu-system-aarch64 ... -chardev socket,id=c0,path=/tmp/ev/0-blk.sock,reconnect=1 \\
          -device vhost-user-blk,chardev=c0,iommu_platform=on
    \b
      edgevirt backend run --transport msg --device blk:path=disk.img --device rng \\
          --ivshmem-socket /tmp/ev/ivshmem.sock --carveout-file /dev/shm/carveout \\
          --carveout-base 0x5c000000
      qemu-system-aarch64 ... -chardev socket,id=iv,path=/tmp/ev/ivshmem.sock \\
          -device ivshmem-doorbell,chardev=iv,vectors=2
    \b
      edgevirt backend run --spec backend.toml      # see edgevirt/backend/config.py
    """
    from edgevirt.backend.config import load_backend_spec

    logging.getLogger().setLevel(log_level.upper())
    spec = None
    if spec_file is not None:
        if devices:
            raise click.UsageError("give the devices either with --device or in --spec, not both")
        try:
            spec = load_backend_spec(spec_file)
        except EdgevirtError as e:
            fail(e)
        if transport is not None and transport != spec.transport:
            raise click.UsageError(
                f"--transport {transport}, but {spec_file} says transport = {spec.transport!r}"
            )
    elif not devices:
        raise click.UsageError("nothing to serve: give --device (repeatable) or --spec FILE")
    transport = transport or (spec.transport if spec else "vhost-user")
    stats = stats or (spec.stats if spec else None)
    where = f" or in {spec_file}" if spec_file else ""
    # Every usage check before anything is opened.
    if transport == "vhost-user":
        msg_opts = {"--ivshmem-socket": ivshmem_socket, "--carveout-file": carveout_file,
                    "--carveout-base": carveout_base, "--carveout-size": carveout_size,
                    "--poll-interval": poll_interval}  # fmt: skip
        stray = [k for k, v in msg_opts.items() if v is not None]
        if stray:
            raise click.UsageError(f"{', '.join(stray)}: only for --transport msg")
        socket_dir = socket_dir or (spec.socket_dir if spec else None)
        if socket_dir is None:
            raise click.UsageError(
                f"vhost-user needs --socket-dir{where} ([vhost_user] socket_dir)"
            )
    else:
        if socket_dir is not None:
            raise click.UsageError("--socket-dir: only for --transport vhost-user")
        m = spec.msg if spec else None
        sock = ivshmem_socket or (m.socket if m else None)
        cfile = carveout_file or (m.carveout_file if m else None)
        base = _number(carveout_base, "--carveout-base", parse_address)
        base = base if base is not None else (m.carveout_base if m else None)
        size = _number(carveout_size, "--carveout-size", parse_size)
        size = size if size is not None else (m.carveout_size if m else None)
        poll = poll_interval if poll_interval is not None else (m.poll_interval if m else None)
        for value, opt, key in ((sock, "--ivshmem-socket", "socket"),
                                (cfile, "--carveout-file", "carveout_file"),
                                (base, "--carveout-base", "carveout_base")):  # fmt: skip
            if value is None:
                raise click.UsageError(f"--transport msg needs {opt}{where} ([msg] {key})")
    try:
        opened = _open_devices(devices, spec)
    except EdgevirtError as e:
        fail(e)
    try:
        if transport == "vhost-user":
            assert socket_dir is not None
            svc, endpoints = _vhost_user(opened, socket_dir, stats)
        else:
            assert sock is not None and cfile is not None and base is not None
            svc, endpoints = _msg(opened, sock, cfile, base, size, poll, stats)
    except BaseException:
        for d in opened:
            d.close()
        raise
    if as_json:
        ready = {"event": "ready", "transport": transport, **endpoints}
        click.echo(json.dumps(ready), nl=True)
    else:
        for name, where_ in endpoints.get("sockets", {}).items():
            err.print(f"[cyan]serving[/] {name} on {where_}")
        if "bus" in endpoints:
            names = ", ".join(f"{n}={d}" for n, d in enumerate(endpoints["devices"]))
            err.print(f"[cyan]serving[/] virtio-msg bus on {endpoints['bus']}: {names}")
    if as_json or not sys.stdout.isatty():
        final = svc.serve()
    else:
        final = _serve_live(svc)
    if as_json:
        click.echo(json.dumps(final, indent=2))
    else:
        render(final)


def _open_devices(devices: tuple[str, ...], spec: BackendSpec | None) -> list[VirtioDevice]:
    from edgevirt.backend.config import DeviceSpec
    from edgevirt.backend.devices import parse_device

    opened: list[VirtioDevice] = []
    try:
        for d in spec.devices if spec else devices:
            opened.append(d.open() if isinstance(d, DeviceSpec) else parse_device(d))
    except BaseException:
        for dev in opened:
            dev.close()
        raise
    return opened


def _number(text: str | None, opt: str, parse: Callable[[str, str], int]) -> int | None:
    if text is None:
        return None
    try:
        return parse(text, opt)
    except ConfigError as e:
        raise click.BadParameter(str(e).removeprefix(f"{opt}: "), param_hint=opt) from None


class _Service(Protocol):
    loop: Loop

    def snapshot(self) -> dict: ...

    def serve(self) -> dict: ...


class _VhostUserService:
    """BackendService under the `serve()` name the virtio-msg service has."""

    def __init__(self, svc: BackendService) -> None:
        self.svc = svc
        self.loop = svc.loop

    def snapshot(self) -> dict:
        return self.svc.snapshot()

    def serve(self) -> dict:
        return self.svc.run()


def _vhost_user(
    devices: list[VirtioDevice], socket_dir: Path, stats: Path | None
) -> tuple[_Service, dict]:
    from edgevirt.backend.service import BackendService, Endpoint
    from edgevirt.deploy.backend_process import backend_socket

    try:
        socket_dir.mkdir(parents=True, exist_ok=True)
        eps = [Endpoint(d, backend_socket(socket_dir, i, d.name)) for i, d in enumerate(devices)]
        svc = BackendService(eps, stats)
    except EdgevirtError as e:
        fail(e)
    except OSError as e:
        fail(SetupError(f"socket directory {socket_dir}: {e.strerror or e}"))
    return _VhostUserService(svc), {"sockets": {ep.device.name: str(ep.socket) for ep in eps}}


def _msg(
    devices: list[VirtioDevice],
    sock: Path,
    carveout: Path,
    base: int,
    size: int | None,
    poll: float | None,
    stats: Path | None,
) -> tuple[_Service, dict]:
    from edgevirt.backend.config import open_msg_service
    from edgevirt.backend.transport.virtio_msg.service import map_carveout

    try:
        sock.parent.mkdir(parents=True, exist_ok=True)
        mem = map_carveout(carveout, base, size)
        svc = open_msg_service(devices, mem, sock, stats, poll)
    except EdgevirtError as e:
        fail(e)
    except OSError as e:
        fail(SetupError(f"ivshmem socket directory {sock.parent}: {e.strerror or e}"))
    info = {
        "bus": str(sock),
        "devices": [d.name for d in devices],
        "carveout": {"file": str(carveout), "base": hex(base), "size": mem.mapped_bytes},
        "poll_interval": poll,
    }
    return svc, info


def _serve_live(svc: _Service, period: float = 0.5) -> dict:
    """Serve with a rich Live view of the counters, redrawn from the service's own loop
    (no thread touches the service); log records print above the view meanwhile."""
    from rich.live import Live
    from rich.logging import RichHandler

    started = time.monotonic()

    def view() -> Group:
        up = time.monotonic() - started
        return Group(*tables(svc.snapshot()), f"[dim]serving for {up:.0f} s; Ctrl-C stops[/]")

    root = logging.getLogger()
    saved = root.handlers[:]
    with Live(view(), console=out, auto_refresh=False, transient=True) as live:
        root.handlers = [RichHandler(console=live.console, show_path=False)]
        svc.loop.every(period, lambda: live.update(view(), refresh=True))
        try:
            return svc.serve()
        finally:
            root.handlers = saved


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
    for t in tables(stats):
        out.print(t)


def tables(stats: dict) -> list[Table]:
    """Devices, one row per queue and, for virtio-msg, the bus: what an operator looks at
    first. Works on either transport's statistics (``backend status`` reads both)."""
    msg = stats.get("transport") == "virtio-msg"
    state = "running" if stats.get("running") else "stopped"
    title = f"back-end pid {stats.get('pid')} ({state}, ring {stats.get('ring')})"
    dev_table = Table(title=title + (", virtio-msg bus" if msg else ", vhost-user"))
    first = ("device", "dev_num") if msg else ("device", "connected")
    for col in (*first, "mapped", "requests", "in B", "out B", "errors", "refused", "broken"):
        dev_table.add_column(col, justify="right" if col not in ("device", "broken") else "left")
    q_cols = ["device", "queue", "size", "served"]
    if not msg:
        q_cols[3:3] = ["started"]
        q_cols += ["kicks", "calls", "resubmitted", "avail idx", "inflight", "io"]
    q_table = Table(title="queues")
    for col in (*q_cols, "broken"):
        q_table.add_column(col, justify="left" if col in ("device", "broken") else "right")
    for d in stats.get("devices", []):
        dev_table.add_row(
            d.get("device", "?"),
            str(d.get("dev_num")) if msg else "yes" if d.get("connected") else "no",
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
            cells = {
                "device": d.get("device", "?"),
                "queue": str(q.get("index")),
                "size": str(q.get("size")),
                "started": "yes" if q.get("started") else "no",
                "served": str(q.get("served", 0)),
                "kicks": str(q.get("kicks", 0)),
                "calls": str(q.get("notifications", 0)),
                "resubmitted": str(q.get("resubmitted", 0)),
                "avail idx": str(q.get("last_avail_idx", 0)),
                "inflight": "yes" if q.get("inflight_tracking") else "no",
                "io": q.get("io", "-"),
            }
            q_table.add_row(
                *(cells[c] for c in q_cols),
                q.get("broken") or "-",
                style="red" if q.get("broken") else None,
            )
    result = [dev_table, q_table]
    if msg:
        bus = Table(title="virtio-msg bus")
        cols = ("socket", "connected", "messages in", "out", "doorbells in", "out ",
                "coalesced", "dropped", "protocol errors")  # fmt: skip
        for col in cols:
            bus.add_column(col, justify="left" if col == "socket" else "right")
        bad = stats.get("protocol_errors") or stats.get("dropped")
        bus.add_row(
            str(stats.get("socket") or stats.get("link") or "-"),
            f"peer {stats.get('peer')}" if stats.get("connected") else "no",
            str(stats.get("messages_in", 0)),
            str(stats.get("messages_out", 0)),
            str(stats.get("doorbells_in", 0)),
            str(stats.get("doorbells_out", 0)),
            str(stats.get("coalesced", 0)),
            str(stats.get("dropped", 0)),
            str(stats.get("protocol_errors", 0)),
            style="red" if bad else None,
        )
        result.append(bus)
        for e in stats.get("errors", [])[:5]:
            bus.caption = (bus.caption + "\n" if bus.caption else "") + f"error: {e}"
    return result
