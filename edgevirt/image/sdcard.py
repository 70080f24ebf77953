"""SD-card images for boards that boot from a card: an MBR, one FAT32 boot partition.

What goes on the partition, as genimage/Buildroot lay out a Raspberry Pi card: the kernel
``Image``, ``initramfs.cpio.gz``, the composed ``guest.dtb``, a U-Boot script ``boot.scr``
(``mkimage -T script``; U-Boot's distro boot runs it from the first partition), the board's
U-Boot binary with the ``config.txt`` that makes the GPU firmware start it, and, if given,
the firmware files themselves. The user ``dd``s the result to a card.

No root, no loop mount: ``mkfs.fat`` (dosfstools) formats a partition file, ``mcopy``
(mtools) fills it, and this module writes the MBR and joins the two. Deterministic: the
volume ID and the MBR's disk signature are hashes of the inputs, file times are
``SOURCE_DATE_EPOCH`` (at least 1980-01-01, FAT's first day) in UTC, files are copied in
sorted order; the same inputs give the same bytes.

Profile section (``[sdcard]``, read from ``Board.raw``)::

    size = "64M"            # whole card image; QEMU wants a power of two
    firmware = "/usr/lib/u-boot/rpi_3/u-boot.bin"   # copied as u-boot.bin
    config_txt = "arm_64bit=1\\nkernel=u-boot.bin\\n…"   (default: Raspberry Pi's for U-Boot)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgevirt.board import Board, check_keys, get_key, parse_size
from edgevirt.errors import ConfigError, ImageError, SetupError

SECTOR = 512
#: The partition starts at 1 MiB, where card vendors and genimage put it (erase blocks).
PART_START = 1 << 20
FAT32_LBA = 0x0C
#: FAT timestamps start on 1980-01-01 00:00:00 UTC.
FAT_FIRST_DAY = 315532800
DEFAULT_SIZE = 64 << 20
#: What the GPU firmware needs to start 64-bit U-Boot; enable_uart fixes the core clock so
#: the mini UART keeps its baud rate (U-Boot doc/board/broadcom/raspberrypi.rst).
RPI_CONFIG_TXT = "arm_64bit=1\nkernel=u-boot.bin\nenable_uart=1\n"
TOOLS = {"mkfs.fat": "dosfstools", "mcopy": "mtools", "mdir": "mtools", "mkimage": "u-boot-tools"}
FAT_TYPES = {0x01, 0x04, 0x06, 0x0B, 0x0C, 0x0E}


@dataclass
class CardLayout:
    """Everything that decides the card's bytes."""

    size: int
    files: dict[str, Path]  # name on the FAT partition -> host file
    texts: dict[str, str] = field(default_factory=dict)  # name -> generated content
    epoch: int = FAT_FIRST_DAY
    label: str = "EDGEVIRT"


@dataclass(frozen=True)
class BootScript:
    """What ``boot.scr`` does: load three files from its own partition, ``booti``."""

    bootargs: str
    kernel_addr: int
    ramdisk_addr: int
    fdt_addr: int
    #: Where the script loads from when run by hand (distro boot sets these itself).
    devtype: str = "mmc"
    devnum: int = 0
    part: int = 1

    def source(self) -> str:
        load = "load ${devtype} ${devnum}:${distro_bootpart}"
        return "\n".join(
            [
                "# edgevirt: kernel, initramfs and composed DTB from this partition",
                f'test -n "${{devtype}}" || setenv devtype {self.devtype}',
                f'test -n "${{devnum}}" || setenv devnum {self.devnum}',
                f'test -n "${{distro_bootpart}}" || setenv distro_bootpart {self.part}',
                f"setenv bootargs '{self.bootargs}'",
                "setenv initrd_high 0xffffffffffffffff",
                "setenv fdt_high 0xffffffffffffffff",
                f"{load} {self.kernel_addr:#x} Image",
                f"{load} {self.ramdisk_addr:#x} initramfs.cpio.gz",
                "setenv ev_initrd_size ${filesize}",
                f"{load} {self.fdt_addr:#x} guest.dtb",
                "echo edgevirt: booting from ${devtype} ${devnum}:${distro_bootpart}",
                f"booti {self.kernel_addr:#x} {self.ramdisk_addr:#x}:${{ev_initrd_size}} "
                f"{self.fdt_addr:#x}",
                "",
            ]
        )


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise SetupError(f"{name} not found", hint=f"apt-get install {TOOLS[name]} (make setup)")
    return path


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    if r.returncode:
        raise ImageError(
            f"`{' '.join(cmd)}` failed (exit {r.returncode}): "
            + " | ".join((r.stderr or r.stdout).strip().splitlines()[-3:])
        )


def compile_script(script: str, out: Path, epoch: int) -> Path:
    """``mkimage -T script``: the legacy image U-Boot's ``source`` runs."""
    src = out.with_suffix(".cmd")
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text(script)
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch)}
    _run(
        [_tool("mkimage"), "-A", "arm64", "-O", "linux", "-T", "script", "-C", "none",
         "-n", "edgevirt boot script", "-d", str(src), str(out)],
        env,
    )  # fmt: skip
    return out


def mbr(disk_size: int, part_start: int, part_size: int, signature: int) -> bytes:
    """A classic MBR with one bootable FAT32-LBA partition (CHS fields say "use LBA")."""
    entry = struct.pack(
        "<B3sB3sII",
        0x80,
        b"\xfe\xff\xff",
        FAT32_LBA,
        b"\xfe\xff\xff",
        part_start // SECTOR,
        part_size // SECTOR,
    )
    assert part_start + part_size <= disk_size
    return bytes(440) + struct.pack("<IH", signature, 0) + entry + bytes(48) + b"\x55\xaa"


def _digest(layout: CardLayout) -> bytes:
    h = hashlib.sha256(f"{layout.size}:{layout.epoch}:{layout.label}".encode())
    for name in sorted(layout.files):
        h.update(name.encode() + b"\0")
        with open(layout.files[name], "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    for name in sorted(layout.texts):
        h.update(name.encode() + b"\0" + layout.texts[name].encode())
    return h.digest()


def write_card(layout: CardLayout, out: Path) -> Path:
    """Write the card image ``out`` (MBR + FAT32 partition) from ``layout``."""
    if layout.size & (layout.size - 1) or layout.size < (64 << 20):
        raise ConfigError(
            f"[sdcard] size {layout.size:#x}: expected a power of two of at least 64 MiB "
            "(QEMU's SD model refuses other sizes; FAT32 needs ~33 MiB)"
        )
    names = list(layout.files) + list(layout.texts)
    for name in names:
        if "/" in name or not name or names.count(name) > 1:
            raise ConfigError(f"card file name {name!r}: expected one plain, unique name")
    digest = _digest(layout)
    part_size = layout.size - PART_START
    epoch = max(layout.epoch, FAT_FIRST_DAY)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".sdcard-") as tmp:
        t = Path(tmp)
        part = t / "boot.vfat"
        _run(
            [_tool("mkfs.fat"), "-F", "32", "-n", layout.label[:11], "--invariant",
             "-i", digest[:4].hex(), "-h", str(PART_START // SECTOR), "-C", str(part),
             str(part_size // 1024)]
        )  # fmt: skip
        stage = t / "files"
        stage.mkdir()
        for name in sorted(names):
            dest = stage / name
            if name in layout.files:
                shutil.copyfile(layout.files[name], dest)
            else:
                dest.write_text(layout.texts[name])
            os.utime(dest, (epoch, epoch))
        env = {**os.environ, "TZ": "UTC", "MTOOLS_SKIP_CHECK": "1"}
        for name in sorted(names):  # one at a time: directory order = sorted order
            _run([_tool("mcopy"), "-m", "-i", str(part), str(stage / name), f"::{name}"], env)
        tmp_out = t / "card.img"
        with open(tmp_out, "wb") as f:
            f.write(mbr(layout.size, PART_START, part_size, int.from_bytes(digest[4:8], "little")))
            f.seek(PART_START)
            with open(part, "rb") as p:
                shutil.copyfileobj(p, f, 1 << 20)
            f.truncate(layout.size)
        os.replace(tmp_out, out)
    return out


def card_layout(
    board: Board,
    *,
    kernel: Path,
    initramfs: Path,
    dtb: Path,
    bootargs: str,
    script_out: Path,
    epoch: int,
    firmware_dir: Path | None = None,
) -> CardLayout:
    """The card for ``board`` from its ``[sdcard]`` and ``[bootloader]`` sections."""
    w = board.where("sdcard")
    sd: dict[str, Any] = board.raw.get("sdcard")  # type: ignore[assignment]
    if sd is None:
        raise ConfigError(f"{board.path}: board {board.name!r} has no [sdcard] section")
    check_keys(sd, {"size", "firmware", "config_txt"}, w)
    bl = board.bootloader
    if bl is None or bl.ramdisk_addr_r is None or bl.fdt_addr_r is None:
        raise ConfigError(
            f"{board.where('bootloader')}: a card's boot.scr needs kernel_addr_r, "
            "ramdisk_addr_r and fdt_addr_r"
        )
    size = parse_size(get_key(sd, "size", (str, int), w, DEFAULT_SIZE), f"{w}.size")
    files: dict[str, Path] = {"Image": kernel, "initramfs.cpio.gz": initramfs, "guest.dtb": dtb}
    fw = get_key(sd, "firmware", str, w, None)
    if fw is not None:
        if not Path(fw).is_file():
            raise SetupError(f"{w}.firmware: {fw} not found", hint="install the board's U-Boot")
        files["u-boot.bin"] = Path(fw)
    if firmware_dir is not None:
        for p in sorted(firmware_dir.iterdir()):
            if p.is_file():
                files.setdefault(p.name, p)
    script = BootScript(bootargs, bl.kernel_addr_r, bl.ramdisk_addr_r, bl.fdt_addr_r)
    files["boot.scr"] = compile_script(script.source(), script_out, epoch)
    texts = {"config.txt": get_key(sd, "config_txt", str, w, RPI_CONFIG_TXT)}
    for p in files.values():
        if not p.is_file():
            raise ImageError(f"card file {p} does not exist")
    return CardLayout(size, files, texts, epoch)


def partitions(mbr_sector: bytes) -> list[tuple[int, int, int, bool]]:
    """(type, first LBA, sectors, bootable) of the MBR's used entries; [] if no MBR."""
    if len(mbr_sector) < SECTOR or mbr_sector[510:512] != b"\x55\xaa":
        return []
    out = []
    for i in range(4):
        status, _, ptype, _, lba, count = struct.unpack_from("<B3sB3sII", mbr_sector, 446 + 16 * i)
        if ptype:
            out.append((ptype, lba, count, status == 0x80))
    return out


def inspect_card(path: Path) -> dict[str, Any]:
    """The card's partitions and, for the first FAT one, its files (``mdir``)."""
    with open(path, "rb") as f:
        parts = partitions(f.read(SECTOR))
    size = path.stat().st_size
    for _type, lba, count, _ in parts:
        if (lba + count) * SECTOR > size:
            raise ImageError(
                f"{path}: partition at LBA {lba} with {count} sectors runs past the image "
                f"({size} bytes)"
            )
    info: dict[str, Any] = {
        "kind": "sdcard",
        "path": str(path),
        "size": size,
        "partitions": [
            {"type": hex(t), "start": lba, "sectors": n, "bootable": b} for t, lba, n, b in parts
        ],
    }
    fat = [p for p in parts if p[0] in FAT_TYPES]
    if fat:
        env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
        r = subprocess.run(
            [_tool("mdir"), "-b", "-i", f"{path}@@{fat[0][1] * SECTOR}", "::"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        if r.returncode:
            raise ImageError(f"{path}: the FAT partition does not read: {r.stderr.strip()}")
        info["files"] = sorted(ln.rsplit("/", 1)[-1] for ln in r.stdout.split())
    return info
