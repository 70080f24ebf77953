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
    """Guest kernel (Debian linux-source or your own, + edgevirt's config fragments)."""


@kernel.command("build")
@click.option(
    "--fragment",
    "fragments",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Extra config fragment, merged after images/kernel/*.config (repeatable).",
)
@click.option(
    "--tarball",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Kernel source tarball instead of Debian's linux-source-6.1.",
)
@click.option(
    "--tree",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Kernel source tree (copied, never built in place).",
)
@click.option("--rebuild", "--force", "force", is_flag=True, help="Rebuild even if cached.")
@click.option("--json", "as_json", is_flag=True)
def kernel_build(
    fragments: tuple[Path, ...],
    tarball: Path | None,
    tree: Path | None,
    force: bool,
    as_json: bool,
) -> None:
    """Build the kernel, or print where the cached build for these inputs is."""
    from edgevirt.image.kernel import KernelSource, build_kernel, default_fragments

    if tarball and tree:
        raise click.UsageError("--tarball and --tree are exclusive")
    rep = RichReporter(quiet=as_json)
    try:
        source = (
            KernelSource("tarball", tarball)
            if tarball
            else KernelSource("tree", tree)
            if tree
            else KernelSource()
        )
        kb = build_kernel(
            fragments=[*default_fragments(), *fragments],
            source=source,
            force=force,
            progress=rep.progress,
            on_wait=rep.step,
        )
    except EdgevirtError as e:
        fail(e)
    rep.step(f"kernel {kb.release} ({kb.key})")
    info = {"key": kb.key, "release": kb.release, "image": str(kb.image), "log": str(kb.log)}
    click.echo(json.dumps(info, indent=2) if as_json else f"{kb.image}")
