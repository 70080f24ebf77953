"""Images for a real board (or its QEMU model): kernel, initramfs, the carve-out DTB, a card.

The device tree is the board's own base tree (``[dt] source``) with the system spec's
carve-out composed onto it (:func:`~edgevirt.devicetree.system.compose_system`). Without a
spec the board gets :func:`default_board_spec`: one front-end VM and one 64 MiB
``restricted-dma-pool`` placed automatically in free RAM, clear of reserved regions and the
bootloader's load windows. With ``--image DIR`` the images are taken as they are and the
carve-out is read back from the DTB's ``/reserved-memory``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from edgevirt.board import Board
from edgevirt.deploy.machine import Images
from edgevirt.devicetree.fdt import Fdt
from edgevirt.errors import DeployError, DeviceTreeError
from edgevirt.report import Reporter
from edgevirt.spec import Carveout, SystemSpec, Vm

DEFAULT_CARVEOUT = 64 << 20
RESTRICTED_DMA_POOL = b"restricted-dma-pool\0"


def default_board_spec(board: Board) -> SystemSpec:
    """One front-end with a 64 MiB restricted-dma-pool, placed by the composer."""
    co = Carveout("carveout", DEFAULT_CARVEOUT, None, 2 << 20, "restricted-dma-pool", "guest")
    path = Path(f"<default spec for {board.name}: 64 MiB carve-out>")
    return SystemSpec("carveout", path, (Vm("guest", "frontend"),), (co,), (), None)


def compose_board_dtb(
    board: Board, build: Path, spec: SystemSpec | None = None
) -> tuple[Path, tuple[int, int]]:
    """``guest.dtb/.dtbo/.dts`` and ``plan.json`` in ``build``; the carve-out (base, size)."""
    from edgevirt.devicetree.basedtb import base_dtb
    from edgevirt.devicetree.compose import write_outputs
    from edgevirt.devicetree.system import compose_system

    spec = spec or default_board_spec(board)
    if len(spec.frontends) != 1:
        raise DeployError(f"{spec.where('[[vm]]')}: a board deploy boots one front-end VM")
    base = base_dtb(board)
    plan = compose_system(board, base.fdt, spec)
    fe = spec.frontends[0].name
    paths = write_outputs(base.fdt, plan.overlays[fe], build, "guest")
    (build / "plan.json").write_text(json.dumps(plan.to_json(), indent=2) + "\n")
    pools = [p for p in plan.placed if p.kind == "carveout" and p.vm == fe]
    if not pools:
        raise DeployError(f"{spec.where('[[carveout]]')}: no carve-out for front-end {fe!r}")
    return paths["dtb"], (pools[0].base, pools[0].size)


def carveout_of(dtb: Path) -> tuple[int, int] | None:
    """The first ``restricted-dma-pool`` under ``/reserved-memory`` of ``dtb``: (base, size)."""
    try:
        fdt = Fdt.from_file(dtb)
    except (DeviceTreeError, OSError) as e:
        raise DeployError(f"{dtb}: not a readable DTB: {e}") from None
    rmem = fdt.root.child("reserved-memory")
    if rmem is None:
        return None
    ac, sc = fdt.cells("/reserved-memory")
    for child in rmem.children.values():
        compat = child.get("compatible")
        reg = child.get("reg")
        if compat is not None and reg is not None and RESTRICTED_DMA_POOL in compat.value:
            return reg.as_cells(ac, sc)[0]
    return None


def prepare_board_images(
    board: Board,
    build: Path,
    reporter: Reporter,
    *,
    image_dir: Path | None = None,
    spec: SystemSpec | None = None,
    kernel_fragment: Path | None = None,
) -> Images:
    """Build (or take from ``image_dir``) what a board boots; compose its carve-out DTB."""
    if image_dir is not None:
        kernel, initrd, dtb = (image_dir / n for n in ("Image", "initramfs.cpio.gz", "guest.dtb"))
        for p in (kernel, initrd, dtb):
            if not p.is_file():
                raise DeployError(
                    f"--image {image_dir}: {p.name} is missing (Image, initramfs.cpio.gz, "
                    "guest.dtb: `edgevirt image build --board …` writes them)"
                )
        fit = image_dir / "guest.itb"
        images = Images(kernel, initrd, dtb, fit if fit.exists() else None)
        images.carveout = carveout_of(dtb)
        return images
    from edgevirt.image.build import build_guest_image
    from edgevirt.image.spec import load_image_spec

    ispec = load_image_spec(spec.path if spec and spec.path.is_file() else None)
    if kernel_fragment is not None:
        ispec = replace(ispec, fragments=(*ispec.fragments, kernel_fragment))
    reporter.step(f"device tree: {board.dt.source} + carve-out overlay")
    dtb, carveout = compose_board_dtb(board, build, spec)
    reporter.step(f"carve-out: restricted-dma-pool at {carveout[0]:#x}, {carveout[1] >> 20} MiB")
    img = build_guest_image(board, build, spec=ispec, reporter=reporter)
    images = Images(img.image, img.initramfs, dtb)
    images.carveout = carveout
    return images
