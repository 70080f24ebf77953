"""The `edgevirt` command: thin click commands over library functions; the only printer.

One module per command group under this package; this file only assembles them.
Exit codes: 0 success, 1 a check or the target failed, 2 usage error, 3 the host is missing
something (`make setup` fixes it), 4 a board/spec/config file is invalid.
"""

from __future__ import annotations

import logging
import threading

import click

from edgevirt import __version__
from edgevirt.cli import (
    backend,
    console,
    deploy,
    doctor,
    dt,
    image,
    kernel,
    lab,
    servicevm,
    test,
    tftp,
    up,
)
from edgevirt.cli.common import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_SETUP, EXIT_USAGE

__all__ = ["cli", "main", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_SETUP", "EXIT_CONFIG"]


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
      edgevirt doctor                  # which host tools are there, which are missing
      edgevirt backend run --device blk:path=disk.img --device rng --socket-dir /tmp/ev
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


cli.add_command(up.up)
cli.add_command(kernel.kernel)
cli.add_command(dt.dt)
cli.add_command(backend.backend)
cli.add_command(deploy.deploy)
cli.add_command(console.console)
cli.add_command(test.test)
cli.add_command(image.image)
cli.add_command(servicevm.servicevm)
cli.add_command(tftp.tftp)
cli.add_command(doctor.doctor)
cli.add_command(lab.lab)


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    # pyserial's RFC2217 reader thread dies with a traceback when ser2net drops the
    # connection; the console reports the drop itself, as a clear error.
    name = args.thread.name if args.thread is not None else ""
    if name.startswith("pySerial RFC 2217 reader thread") and issubclass(args.exc_type, OSError):
        logging.getLogger("edgevirt.console").debug("%s: %s", name, args.exc_value)
        return
    threading.__excepthook__(args)


def main() -> None:
    threading.excepthook = _thread_excepthook
    cli(prog_name="edgevirt")
