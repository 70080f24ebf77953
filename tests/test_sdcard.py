"""SD-card images: deterministic bytes, a partition table and filesystem other tools accept."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from edgevirt.board import load_board
from edgevirt.errors import ConfigError
from edgevirt.image.sdcard import BootScript, CardLayout, card_layout, write_card

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) or Path("/usr/sbin", t).exists() for t in ("mcopy", "mkfs.fat")),
    reason="mtools/dosfstools not installed (make setup)",
)
ENV = {"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/sbin:/sbin:/usr/bin:/bin"}


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    files = {}
    for name, size in (("Image", 300_000), ("initramfs.cpio.gz", 70_000), ("guest.dtb", 9000)):
        p = tmp_path / "in" / name
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(bytes((i * 7 + size) & 0xFF for i in range(size)))
        files[name] = p
    return files


def layout(board_name: str, inputs: dict[str, Path], out: Path, epoch: int = 0) -> CardLayout:
    return card_layout(
        load_board(board_name),
        kernel=inputs["Image"],
        initramfs=inputs["initramfs.cpio.gz"],
        dtb=inputs["guest.dtb"],
        bootargs="console=ttyS1,115200 panic=-1",
        script_out=out / "boot.scr",
        epoch=epoch,
    )


def test_card_built_twice_is_byte_identical(tmp_path, inputs):
    a = write_card(layout("rpi3b", inputs, tmp_path / "a"), tmp_path / "a" / "sdcard.img")
    b = write_card(layout("rpi3b", inputs, tmp_path / "b"), tmp_path / "b" / "sdcard.img")
    assert a.read_bytes() == b.read_bytes()
    # Another SOURCE_DATE_EPOCH changes the file times, so the bytes too.
    c = write_card(
        layout("rpi3b", inputs, tmp_path / "c", epoch=1_700_000_000), tmp_path / "c" / "x.img"
    )
    assert c.read_bytes() != a.read_bytes()


def test_partition_table_and_filesystem_checked_by_other_tools(tmp_path, inputs):
    card = write_card(layout("rpi3b", inputs, tmp_path), tmp_path / "sdcard.img")
    assert card.stat().st_size == 64 << 20
    table = json.loads(
        subprocess.run(["sfdisk", "--json", str(card)], capture_output=True, text=True).stdout
    )["partitiontable"]
    (part,) = table["partitions"]
    assert table["label"] == "dos" and part["start"] == 2048 and part["type"] == "c"
    assert part["bootable"] and part["start"] + part["size"] == (64 << 20) // 512
    # The FAT32 file system itself: fsck.fat finds nothing to fix …
    vfat = tmp_path / "p1.vfat"
    with open(card, "rb") as f:
        f.seek(1 << 20)
        vfat.write_bytes(f.read())
    fsck = subprocess.run(["fsck.fat", "-n", str(vfat)], capture_output=True, text=True, env=ENV)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    # … and every file reads back through mtools with the bytes that went in.
    listing = subprocess.run(
        ["mdir", "-b", "-i", f"{card}@@1M", "::"], capture_output=True, text=True, env=ENV
    ).stdout.split()
    names = sorted(p.rsplit("/", 1)[-1] for p in listing)
    assert names == sorted(
        ["Image", "initramfs.cpio.gz", "guest.dtb", "boot.scr", "config.txt", "u-boot.bin"]
    )
    for name, src in inputs.items():
        got = subprocess.run(
            ["mtype", "-i", f"{card}@@1M", f"::{name}"], capture_output=True, env=ENV
        ).stdout
        assert got == src.read_bytes(), name
    config = subprocess.run(
        ["mtype", "-i", f"{card}@@1M", "::config.txt"], capture_output=True, text=True, env=ENV
    ).stdout
    assert "arm_64bit=1" in config and "kernel=u-boot.bin" in config
    # boot.scr is a legacy U-Boot script image (mkimage -T script) with our commands.
    listed = subprocess.run(
        ["dumpimage", "-l", str(tmp_path / "boot.scr")], capture_output=True, text=True
    ).stdout
    assert "Script" in listed


def test_boot_script_uses_the_profile_addresses():
    b = load_board("rpi3b").bootloader
    s = BootScript("console=ttyS1,115200", b.kernel_addr_r, b.ramdisk_addr_r, b.fdt_addr_r)
    text = s.source()
    assert "load ${devtype} ${devnum}:${distro_bootpart} 0x80000 Image" in text
    assert "booti 0x80000 0x2700000:${ev_initrd_size} 0x2600000" in text
    assert "setenv bootargs 'console=ttyS1,115200'" in text


@pytest.mark.parametrize(
    "size,message",
    [(48 << 20, "power of two of at least 64 MiB"), (100 << 20, "power of two")],
)
def test_bad_card_size_is_refused(tmp_path, inputs, size, message):
    lay = layout("rpi3b", inputs, tmp_path)
    lay.size = size
    with pytest.raises(ConfigError, match=message):
        write_card(lay, tmp_path / "x.img")


def test_board_without_sdcard_section_is_refused(tmp_path, inputs):
    with pytest.raises(ConfigError, match=r"rpi4b.toml: board 'rpi4b' has no \[sdcard\]"):
        layout("rpi4b", inputs, tmp_path)


def test_inspect_lists_the_card_and_refuses_a_truncated_one(tmp_path, inputs):
    from edgevirt.errors import ImageError
    from edgevirt.image.inspect import inspect_path

    card = write_card(layout("rpi3b", inputs, tmp_path), tmp_path / "sdcard.img")
    info = inspect_path(card)
    assert info["kind"] == "sdcard" and info["partitions"][0]["start"] == 2048
    assert "boot.scr" in info["files"] and "Image" in info["files"]
    short = tmp_path / "short.img"
    short.write_bytes(card.read_bytes()[: 8 << 20])
    with pytest.raises(ImageError, match=r"partition at LBA 2048 with 129024 sectors runs past"):
        inspect_path(short)
