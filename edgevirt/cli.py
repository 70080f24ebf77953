"""The `edgevirt` command: thin click commands over library functions; the only printer.

Exit codes: 0 success, 1 a check or the target failed, 2 usage error, 3 the host is missing
something (`make setup` fixes it), 4 a board/spec/config file is invalid.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgevirt import __version__
from edgevirt.errors import ConfigError, EdgevirtError, SetupError
from edgevirt.up import Reporter

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SETUP, EXIT_CONFIG = 0, 1, 2, 3, 4

out = Console()
err = Console(stderr=True)


def fail(e: EdgevirtError) -> NoReturn:
    err.print(f"[bold red]error:[/] {e}")
    if e.hint:
        err.print(f"[yellow]hint:[/] {e.hint}")
    code = (
        EXIT_SETUP
        if isinstance(e, SetupError)
        else EXIT_CONFIG
        if isinstance(e, ConfigError)
        else EXIT_FAILED
    )
    sys.exit(code)


class RichReporter(Reporter):
    """Renders `up` progress: one line per step, a bar for long builds."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def step(self, text: str) -> None:
        self._close_bar()
        if not self.quiet:
            err.print(f"[cyan]▶[/] {text}")

    def progress(self, phase: str, done: int, total: int) -> None:
        if self.quiet:
            return
        if self._progress is None:
            self._progress = Progress(
                TextColumn("  {task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
                console=err,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(phase, total=total)
        assert self._task is not None
        self._progress.update(self._task, description=phase, completed=done, total=total)

    def _close_bar(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """edgevirt: bring up virtio on Type-1-hypervisor SoCs.

    \b
    Examples:
      edgevirt up                      # whole path on QEMU virt, smoke suite, summary
      edgevirt up --no-restrict        # same guest without the carve-out: must fail clearly
      edgevirt kernel build            # build (or reuse) the guest kernel
      edgevirt backend run --device blk:path=disk.img --device rng --socket-dir /tmp/ev
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


# -- up ------------------------------------------------------------------------------------


def memory_map(result: Any) -> Table:
    base, size = result.carveout
    t = Table(title="guest memory map", show_edge=False)
    t.add_column("range")
    t.add_column("size", justify="right")
    t.add_column("what")
    from edgevirt.board import load_board

    board = load_board(result.board)
    ram = board.qemu.ram_base
    t.add_row(f"{ram:#010x}–{base:#010x}", f"{(base - ram) >> 20} MiB", "private RAM (NUMA node 0)")
    t.add_row(
        f"{base:#010x}–{base + size:#010x}",
        f"{size >> 20} MiB",
        "[green]carve-out[/]: shared file, restricted-dma-pool"
        if result.restrict
        else "shared file, [red]no restricted pool[/]",
    )
    return t


@cli.command()
@click.option("--board", default="qemu-virt", show_default=True, help="Board profile name or file.")
@click.option(
    "--build-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where artefacts and logs go [default: out/<board>].",
)
@click.option("--no-restrict", is_flag=True, help="Leave out the restricted-dma-pool overlay.")
@click.option(
    "--boot-timeout",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds to wait for the guest agent.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def up(
    board: str, build_dir: Path | None, no_restrict: bool, boot_timeout: float, as_json: bool
) -> None:
    """Build, boot and test a carve-out-restricted guest on QEMU virt.

    \b
    Steps: compose the DT overlay, build (or reuse) kernel and initramfs, start the
    back-end (vhost-user-blk + vhost-user-rng), boot QEMU, run the smoke suite over the
    serial console, power off and print a summary. Logs stay in the build dir.
    """
    from edgevirt.up import UpOptions
    from edgevirt.up import up as do_up

    opts = UpOptions(
        build_dir=build_dir or Path("out") / board,
        board=board,
        restrict=not no_restrict,
        boot_timeout=boot_timeout,
    )
    try:
        result = do_up(opts, RichReporter(quiet=as_json))
    except EdgevirtError as e:
        fail(e)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        t = Table(
            title=f"edgevirt up — {result.board}"
            + ("" if result.restrict else " (restriction off)")
        )
        t.add_column("check")
        t.add_column("result")
        t.add_column("detail", overflow="fold")
        for c in result.checks:
            t.add_row(c.name, "[green]PASS[/]" if c.ok else "[red]FAIL[/]", c.detail)
        out.print(t)
        out.print(memory_map(result))
        if result.error:
            err.print(f"[bold red]error:[/] {result.error}")
        verdict = "[bold green]all checks passed[/]" if result.ok else "[bold red]FAILED[/]"
        out.print(f"{verdict} in {result.seconds:.1f}s — logs in {opts.build_dir}")
    sys.exit(EXIT_OK if result.ok else EXIT_FAILED)


# -- kernel --------------------------------------------------------------------------------


@cli.group()
def kernel() -> None:
    """Guest kernel (Debian linux-source + edgevirt fragment)."""


@kernel.command("build")
@click.option(
    "--fragment",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Config fragment [default: images/kernel.config].",
)
@click.option("--force", is_flag=True, help="Rebuild even if the cache has it.")
@click.option("--json", "as_json", is_flag=True)
def kernel_build(fragment: Path | None, force: bool, as_json: bool) -> None:
    """Build the kernel, or print where the cached build for these inputs is."""
    from edgevirt.image.kernel import build_kernel

    rep = RichReporter(quiet=as_json)
    try:
        kb = build_kernel(fragment, force=force, progress=rep.progress)
    except EdgevirtError as e:
        fail(e)
    rep.step(f"kernel {kb.release} ({kb.key})")
    info = {"key": kb.key, "release": kb.release, "image": str(kb.image), "log": str(kb.log)}
    click.echo(json.dumps(info, indent=2) if as_json else f"{kb.image}")


# -- dt ------------------------------------------------------------------------------------


@cli.group()
def dt() -> None:
    """Device trees: the carve-out overlay for a board."""


@dt.command("compose")
@click.option("--board", default="qemu-virt", show_default=True)
@click.option(
    "-o",
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Output directory for guest.dtbo, guest.dts and guest.dtb.",
)
@click.option(
    "--devices",
    type=int,
    default=2,
    show_default=True,
    help="How many virtio-mmio devices the guest uses (QEMU fills slots from the top).",
)
@click.option("--json", "as_json", is_flag=True)
def dt_compose(board: str, out_dir: Path, devices: int, as_json: bool) -> None:
    """Compose the restricted-dma-pool overlay for BOARD and apply it.

    \b
    Example:
      edgevirt dt compose --board qemu-virt -o out/dt
      fdtoverlay -i out/dt/qemu-virt.raw.dtb -o check.dtb out/dt/guest.dtbo   # same result
    """
    import os
    import secrets

    from edgevirt.board import load_board
    from edgevirt.deploy.qemu import QemuConfig, virtio_mmio_slots
    from edgevirt.up import compose_dtb

    shm = Path("/dev/shm") / f"edgevirt-dt-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        b = load_board(board)
        out_dir.mkdir(parents=True, exist_ok=True)
        nodes = [f"/virtio_mmio@{a:x}" for a in virtio_mmio_slots(devices)]
        dtb = compose_dtb(b, QemuConfig(b.qemu, shm), out_dir, True, nodes)
    except EdgevirtError as e:
        fail(e)
    finally:
        shm.unlink(missing_ok=True)
    files = {k: str(out_dir / f"guest.{k}") for k in ("dtbo", "dts", "dtb")}
    info = {
        "board": b.name,
        "carveout": {"base": hex(b.qemu.carveout_base), "size": b.qemu.carveout},
        "nodes": nodes,
        "files": files,
        "size": dtb.stat().st_size,
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    t = Table(title=f"carve-out overlay for {b.name}")
    t.add_column("what")
    t.add_column("value")
    t.add_row("carve-out", f"{b.qemu.carveout_base:#x} + {b.qemu.carveout >> 20} MiB")
    t.add_row("memory-region on", ", ".join(nodes))
    for k, v in files.items():
        t.add_row(k, v)
    out.print(t)


# -- backend -------------------------------------------------------------------------------


@cli.group()
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


def main() -> None:
    cli(prog_name="edgevirt")
