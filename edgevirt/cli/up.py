"""`edgevirt up`: the whole path on a board, for every transport and back-end placement."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from edgevirt.cli.common import EXIT_FAILED, EXIT_OK, RichReporter, err, fail, out
from edgevirt.errors import EdgevirtError
from edgevirt.platforms import PLATFORMS

# Not imported from the library: the CLI starts without the code that runs them.
#: edgevirt.up.TRANSPORTS (and edgevirt.backend.config.TRANSPORTS).
TRANSPORTS = ("vhost-user", "msg")
#: edgevirt.servicevm.up.FAULTS.
FAULTS = ("late-service", "backend-crash", "service-restart")


def memory_map(result: Any) -> Table:
    """The front-end's memory as ``up`` set it up (``result.memory`` rows)."""
    t = Table(title="front-end memory map", show_edge=False)
    t.add_column("range")
    t.add_column("size", justify="right")
    t.add_column("what")
    for row in result.memory:
        base, size = row["base"], row["size"]
        where = "—" if base is None else f"{base:#010x}–{base + size:#010x}"
        amount = f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"
        what = row["what"].replace("carve-out", "[green]carve-out[/]")
        if "no restricted pool" in what:
            what = what.replace("no restricted pool", "[red]no restricted pool[/]")
        t.add_row(where, amount, what)
    return t


def render(result: Any, build_dir: Path) -> None:
    title = f"edgevirt up — {result.board}, {result.transport}, back-end on {result.backend_in}"
    t = Table(title=title + ("" if result.restrict else " (restriction off)"))
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
    if result.failed_vm == "host":
        verdict += " (host build, before any VM ran)"
    elif result.failed_vm:
        verdict += f" ({result.failed_vm} VM)"
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    timings = f" ({timings})" if timings else ""
    out.print(f"{verdict} in {result.seconds:.1f}s{timings} — logs in {build_dir}")


def run_up(opts: Any, as_json: bool) -> None:
    """Run :func:`edgevirt.up.up`, print the report, exit 0 only if everything passed."""
    from edgevirt.up import up as do_up

    try:
        result = do_up(opts, RichReporter(quiet=as_json))
    except EdgevirtError as e:
        fail(e)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        render(result, opts.build_dir)
    sys.exit(EXIT_OK if result.ok else EXIT_FAILED)


@click.command()
@click.option("--board", default="qemu-virt", show_default=True, help="Board profile name or file.")
@click.option(
    "--transport",
    type=click.Choice(TRANSPORTS),
    default=None,
    help="vhost-user devices, or virtio-msg over ivshmem-doorbell [default: the spec's, "
    "else vhost-user; msg with --backend service-vm].",
)
@click.option(
    "--backend",
    type=click.Choice(["host", "service-vm"]),
    default=None,
    help="Run the back-end on the host or in an aarch64 service VM [default: the spec's, "
    "else host].",
)
@click.option(
    "--spec",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="System spec (TOML): devices, carve-out, [msg], backend, [image].",
)
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
    default=None,
    help="Seconds to wait for each VM's agent [default: 120, 180 with a service VM].",
)
@click.option(
    "--fault",
    type=click.Choice(FAULTS),
    default=None,
    help="service-vm: inject a service-VM failure (late-service, backend-crash: the run "
    "must fail naming that VM; service-restart: kill and restart it under the running "
    "front-end, whose devices must come back). xen: backend-crash.",
)
@click.option(
    "--platform",
    type=click.Choice(list(PLATFORMS)),
    default="qemu",
    show_default=True,
    help="qemu: QEMU virt is the hypervisor (back-end on the host or in a service VM); "
    "xen: Debian's Xen 4.17 dom0less on QEMU (front-end and service domUs, virtio-msg over "
    "passthrough regions and static event channels).",
)
@click.option(
    "--boot",
    type=click.Choice(["direct", "uboot"]),
    default="direct",
    show_default=True,
    help="xen: direct (QEMU loads Xen, host DTB and modules) or uboot (u-boot-qemu runs "
    "edgevirt's boot script over TFTP: the real-board path).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def up(
    board: str,
    transport: str | None,
    backend: str | None,
    spec: Path | None,
    build_dir: Path | None,
    no_restrict: bool,
    boot_timeout: float | None,
    fault: str | None,
    platform: str,
    boot: str,
    as_json: bool,
) -> None:
    """Build, boot and test a carve-out-restricted guest on QEMU virt.

    \b
    Steps: build (or reuse) kernel, modules and initramfs, compose the device tree,
    start the back-end (on the host: vhost-user-blk + vhost-user-rng, or the virtio-msg
    bus; or a service VM behind the host's ivshmem server), boot QEMU, run the smoke
    suite over the serial console (and, when --spec has net, vsock, console, gpio or
    i2c, each one's in-guest checks against its far side on the host or in the service
    VM: edgevirt/devsmoke/), power off and print a summary. Logs stay in the build dir.

    \b
    Examples:
      edgevirt up                                       # vhost-user, back-end on the host
      edgevirt up --transport msg --backend service-vm  # two QEMU VMs
      edgevirt up --platform xen --json                 # Xen 4.17 dom0less, two domUs
      edgevirt up --platform xen --boot uboot           # same, loaded by a U-Boot script
      edgevirt up --spec devicetree/specs/qemu-virt-devices.toml  # + net, vsock, gpio, i2c
      edgevirt up --spec devicetree/specs/qemu-virt-devices-svm.toml  # all in a service VM
    """
    from edgevirt.spec import load_spec
    from edgevirt.up import UpOptions

    in_spec = None
    if spec is not None and backend is None:  # the spec may place the back-end
        try:
            in_spec = load_spec(spec).backend
        except EdgevirtError as e:
            fail(e)
    service = (backend or in_spec) == "service-vm" or platform == "xen"
    default_dir = f"{board}-xen" if platform == "xen" else (
        f"{board}-servicevm" if service else board)  # fmt: skip
    opts = UpOptions(
        build_dir=build_dir or Path("out") / default_dir,
        board=board,
        transport=transport,
        backend=backend,
        spec=spec,
        restrict=not no_restrict,
        boot_timeout=boot_timeout if boot_timeout is not None else (180.0 if service else 120.0),
        fault=fault,
        platform=platform,
        boot=boot,
    )
    run_up(opts, as_json)
