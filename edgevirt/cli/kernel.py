"""`edgevirt kernel`: build or locate the cached guest kernel."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgevirt.cli.common import RichReporter, fail
from edgevirt.errors import EdgevirtError

# -- kernel --------------------------------------------------------------------------------


@click.group()
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
