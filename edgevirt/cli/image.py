"""`edgevirt image`: build the guest image (kernel, modules, initramfs, FIT) and inspect it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from edgevirt.cli.common import RichReporter, fail, out
from edgevirt.errors import EdgevirtError


@click.group()
def image() -> None:
    """Guest images: kernel + modules + initramfs + FIT, verified, with a manifest.

    \b
    Examples:
      edgevirt image build --board qemu-virt -o out/image
      edgevirt image build --board rpi4b --spec my-system.toml -o out/rpi4b
      edgevirt image inspect out/image               # re-check every artefact
      edgevirt image inspect out/image/guest.itb --json
    """


def _board_dtb(board: Any, out_dir: Path) -> Path:
    """The FIT's fdt: QEMU boards get the carve-out DTB `up` boots; others their base DTB."""
    if board.is_qemu:
        from edgevirt.deploy.machine import carveout_dtb

        return carveout_dtb(board, out_dir)[0]
    from edgevirt.devicetree.basedtb import base_dtb

    path = out_dir / "guest.dtb"
    path.write_bytes(base_dtb(board, out_dir).fdt.to_bytes())  # compacted, never padded
    return path


@image.command("build")
@click.option("--board", default="qemu-virt", show_default=True, help="Board name or file.")
@click.option(
    "--spec",
    "spec_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="System spec; its [image] section adds fragments, modules, overlays, files.",
)
@click.option(
    "-o",
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Build directory for the artefacts and manifest.json.",
)
@click.option(
    "--dtb",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="fdt for the FIT [default: spec's, else composed for the board].",
)
@click.option("--no-fit", is_flag=True, help="Skip the FIT (and the DTB it needs).")
@click.option("--rebuild", is_flag=True, help="Rebuild the kernel even if the cache has it.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest's summary as JSON.")
def image_build(
    board: str,
    spec_path: Path | None,
    out_dir: Path,
    dtb: Path | None,
    no_fit: bool,
    rebuild: bool,
    as_json: bool,
) -> None:
    """Build the guest image for BOARD into OUT (cached kernel unless --rebuild)."""
    from edgevirt.board import load_board
    from edgevirt.image.build import build_guest_image
    from edgevirt.image.spec import load_image_spec

    rep = RichReporter(quiet=as_json)
    try:
        b = load_board(board)
        spec = load_image_spec(spec_path)
        out_dir.mkdir(parents=True, exist_ok=True)
        if not no_fit and dtb is None and spec.dtb is None:
            rep.step(f"device tree for the FIT: {b.name}")
            dtb = _board_dtb(b, out_dir.resolve())
        img = build_guest_image(
            b, out_dir, spec=spec, reporter=rep, dtb=None if no_fit else dtb, rebuild=rebuild
        )
    except EdgevirtError as e:
        fail(e)
    assert img.manifest is not None
    manifest = json.loads(img.manifest.read_text())
    if as_json:
        click.echo(json.dumps({"dir": str(img.dir), **manifest}, indent=2))
        return
    rep.step("done")
    t = Table(title=f"{b.name}: Linux {img.release} (kernel {img.kernel.key})")
    for col in ("artefact", "size", "sha256"):
        t.add_column(col)
    for name, a in manifest["artefacts"].items():
        t.add_row(name, f"{a['size']:,}", a["sha256"][:16] + "…")
    out.print(t)
    out.print(f"manifest: {img.manifest}")


@image.command("inspect")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--release", help="Require this kernel release (modules, vmlinux, initramfs).")
@click.option("--json", "as_json", is_flag=True)
def image_inspect(path: Path, release: str | None, as_json: bool) -> None:
    """Recognise and verify PATH: build dir, manifest, FIT, DTB, vmlinux, .ko, Image, initramfs."""
    from edgevirt.image.inspect import inspect_path

    try:
        info = inspect_path(path, release=release)
    except EdgevirtError as e:
        fail(e)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    t = Table(title=f"{info['kind']}: {path}", show_header=False)
    t.add_column("field")
    t.add_column("value")
    for k, v in info.items():
        if k in ("kind", "path"):
            continue
        if isinstance(v, dict):
            v = "\n".join(f"{a}: {_short(b)}" for a, b in v.items())
        elif isinstance(v, list):
            v = "\n".join(_short(x) for x in v) or "-"
        t.add_row(k, str(v))
    out.print(t)
    out.print("[green]verified[/]")


def _short(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}={_short(x)}" for k, x in v.items())
    s = str(v)
    return s[:19] + "…" if len(s) == 64 and all(c in "0123456789abcdef" for c in s) else s
