"""`edgevirt image`: build the guest image (kernel, modules, initramfs, FIT) and inspect it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from edgevirt.cli.common import RichReporter, fail, field_table, out, out_dir_option
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
      edgevirt image sdcard --board rpi3b -o out/rpi3b      # then dd sdcard.img to a card
      edgevirt image bootimg --board qcom-sa8155p-adp -o out/adp   # fastboot boot boot.img
    """


def _board_dtb(board: Any, out_dir: Path) -> Path:
    """The FIT's fdt: the carve-out DTB the board boots with `up` (QEMU) or `deploy` (a
    real board: its own tree with the default carve-out composed onto it)."""
    if board.is_qemu:
        from edgevirt.deploy.machine import carveout_dtb

        return carveout_dtb(board, out_dir)[0]
    from edgevirt.deploy.boardimage import compose_board_dtb

    return compose_board_dtb(board, out_dir)[0]


@image.command("build")
@click.option("--board", default="qemu-virt", show_default=True, help="Board name or file.")
@click.option(
    "--spec",
    "spec_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="System spec; its [image] section adds fragments, modules, overlays, files.",
)
@out_dir_option("Build directory for the artefacts and manifest.json.")
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
    rows = [(k, _value(v)) for k, v in info.items() if k not in ("kind", "path")]
    out.print(field_table(f"{info['kind']}: {path}", rows))
    out.print("[green]verified[/]")


def _value(v: Any) -> str:
    if isinstance(v, dict):
        return "\n".join(f"{a}: {_short(b)}" for a, b in v.items())
    if isinstance(v, list):
        return "\n".join(_short(x) for x in v) or "-"
    return str(v)


def _short(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}={_short(x)}" for k, x in v.items())
    s = str(v)
    return s[:19] + "…" if len(s) == 64 and all(c in "0123456789abcdef" for c in s) else s


def _board_images(board: str, image_dir: Path | None, out_dir: Path, rep: RichReporter) -> Any:
    """Kernel, initramfs and the carve-out DTB composed on the board's own tree."""
    from edgevirt.board import load_board
    from edgevirt.deploy.boardimage import prepare_board_images

    b = load_board(board)
    if b.is_qemu:
        from edgevirt.errors import ConfigError

        raise ConfigError(
            f"{b.path}: {b.name} is a QEMU virt board: it boots no card or boot image"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    return b, prepare_board_images(b, out_dir.resolve(), rep, image_dir=image_dir)


def _bootargs(b: Any) -> str:
    baud = b.console.baudrate if b.console else 115200
    return f"console={b.console_kernel},{baud} panic=-1"


_IMAGE_DIR = click.option(
    "--image",
    "image_dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Take Image, initramfs.cpio.gz and guest.dtb from here instead of building them.",
)
_OUT = out_dir_option("Build directory.")


@image.command("sdcard")
@click.option("--board", default="rpi3b", show_default=True, help="Board with an [sdcard].")
@_OUT
@_IMAGE_DIR
@click.option(
    "--firmware",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Also copy these files (e.g. the Pi's bootcode.bin, start.elf, fixup.dat).",
)
@click.option("--json", "as_json", is_flag=True)
def image_sdcard(
    board: str, out_dir: Path, image_dir: Path | None, firmware: Path | None, as_json: bool
) -> None:
    """Write OUT/sdcard.img: MBR + FAT32 with kernel, initramfs, DTB, boot.scr, U-Boot.

    \b
    Deterministic: the same inputs (and SOURCE_DATE_EPOCH) give the same bytes. Write it
    to a card with: dd if=OUT/sdcard.img of=/dev/sdX bs=4M conv=fsync
    A real Raspberry Pi also needs its GPU firmware on the card: pass --firmware DIR
    with bootcode.bin, start.elf and fixup.dat (github.com/raspberrypi/firmware, boot/).
    """
    from edgevirt.image.cpio import source_date_epoch
    from edgevirt.image.sdcard import card_layout, write_card

    rep = RichReporter(quiet=as_json)
    try:
        b, imgs = _board_images(board, image_dir, out_dir, rep)
        rep.step("SD card: MBR + FAT32 (mkfs.fat, mcopy), boot.scr (mkimage -T script)")
        dest = out_dir.resolve()
        layout = card_layout(
            b,
            kernel=imgs.kernel,
            initramfs=imgs.initrd,
            dtb=imgs.dtb,
            bootargs=_bootargs(b),
            script_out=dest / "boot.scr",
            epoch=source_date_epoch(),
            firmware_dir=firmware,
        )
        card = write_card(layout, dest / "sdcard.img")
    except EdgevirtError as e:
        fail(e)
    from edgevirt.image.kernel import file_sha256

    info = {
        "board": b.name,
        "card": str(card),
        "size": card.stat().st_size,
        "sha256": file_sha256(card),
        "files": sorted([*layout.files, *layout.texts]),
        "carveout": [hex(x) for x in imgs.carveout] if imgs.carveout else None,
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    rows = [(k, ", ".join(v) if isinstance(v, list) else str(v)) for k, v in info.items()]
    out.print(field_table(f"{b.name}: SD card image", rows))
    out.print(f"write it: dd if={card} of=/dev/sdX bs=4M conv=fsync")


@image.command("bootimg")
@click.option("--board", default="qcom-sa8155p-adp", show_default=True)
@_OUT
@_IMAGE_DIR
@click.option("--json", "as_json", is_flag=True)
def image_bootimg(board: str, out_dir: Path, image_dir: Path | None, as_json: bool) -> None:
    """Write OUT/boot.img: an Android boot image (header v2: kernel, initramfs, DTB, cmdline)
    for a board whose bootloader boots those (Qualcomm ABL), laid out per its [fastboot].

    \b
    Then: fastboot boot OUT/boot.img   (or: edgevirt deploy --board BOARD)
    """
    from edgevirt.deploy.fastboot import fastboot_settings, write_boot_image
    from edgevirt.image.bootimg import parse_bootimg

    rep = RichReporter(quiet=as_json)
    try:
        b, imgs = _board_images(board, image_dir, out_dir, rep)
        rep.step("Android boot image (header v2)")
        layout = fastboot_settings(b).layout
        path = write_boot_image(
            out_dir.resolve() / "boot.img", imgs.kernel, imgs.initrd, imgs.dtb, _bootargs(b), layout
        )
        info = {
            "board": b.name,
            "boot_img": str(path),
            **parse_bootimg(path.read_bytes()).summary(),
        }
    except EdgevirtError as e:
        fail(e)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    out.print(field_table(f"{b.name}: Android boot image", [(k, str(v)) for k, v in info.items()]))
