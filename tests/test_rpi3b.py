"""Raspberry Pi 3 B on QEMU's raspi3b model, running Debian's u-boot-rpi: a real SoC's
firmware, device tree and console quirks (mini UART on the second port, ``U-Boot>``)."""

import json
import os
import re
import time
from pathlib import Path

import pytest

from edgevirt.board import load_board
from edgevirt.deploy.strategy import State
from edgevirt.deploy.target import DeployOptions, Target
from edgevirt.suite.model import load_suite
from edgevirt.suite.runner import run_suite
from tests.helpers import edgevirt, leftovers

FIRMWARE = Path("/usr/lib/u-boot/rpi_3/u-boot.bin")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not FIRMWARE.exists(), reason="u-boot-rpi:arm64 not installed"),
]


def test_uboot_facts_are_the_profiles(tmp_path):
    """Prompt, autoboot, load addresses and RAM in rpi3b.toml are what this U-Boot says."""
    board = load_board("rpi3b")
    bl = board.bootloader
    with Target(board, DeployOptions(tmp_path, load="ymodem")) as t:
        t.prepare()
        t0 = time.monotonic()
        t.transition(State.BOOTLOADER)
        seconds = time.monotonic() - t0
        u = t.strategy.uboot  # type: ignore[attr-defined]
        env = dict(
            re.findall(
                r"^(\w+)=(\S+)$",
                u.check("printenv kernel_addr_r fdt_addr_r ramdisk_addr_r fdtfile"),
                re.M,
            )
        )
        bd = u.check("bdinfo")
        version = u.check("version")
        assert u.has_command("lzmadec") and u.has_command("loady")
        assert not u.has_command("no-such-command")
    assert int(env["kernel_addr_r"], 16) == bl.kernel_addr_r
    assert int(env["fdt_addr_r"], 16) == bl.fdt_addr_r
    assert int(env["ramdisk_addr_r"], 16) == bl.ramdisk_addr_r
    assert env["fdtfile"] == "broadcom/bcm2837-rpi-3-b.dtb" == board.dt.argument
    start = int(re.search(r"-> start\s+= (0x[0-9a-f]+)", bd)[1], 16)
    size = int(re.search(r"-> size\s+= (0x[0-9a-f]+)", bd)[1], 16)
    assert [(r.base, r.size) for r in board.ram] == [(start, size)]
    assert version.startswith("U-Boot 2023.01")
    log = (tmp_path / "console.log").read_text()
    # The console is the second serial port: U-Boot's banner came through it, the autoboot
    # was stopped on this board's prompt.
    assert "RPI 3 Model B" in log and "Hit any key to stop autoboot" in log
    assert "U-Boot> " == bl.prompt and "U-Boot> " in log
    assert "-serial null -serial chardev:ev-con" in (tmp_path / "qemu.cmdline").read_text()
    assert seconds < 30
    assert not leftovers(str(tmp_path))


def test_compressed_loady_arrives_whole(tmp_path):
    """The no-card path's transfer: an LZMA stream over ymodem, lzmadec'd by this U-Boot
    to the kernel's address, byte for byte (crc32 in U-Boot against the host's)."""
    import zlib

    from edgevirt.deploy.uboot import lzma_alone

    board = load_board("rpi3b")
    bl = board.bootloader
    data = (os.urandom(4096) + bytes(60000)) * 5  # some entropy, mostly compressible
    with Target(board, DeployOptions(tmp_path, load="ymodem")) as t:
        t.prepare()
        t.transition(State.BOOTLOADER)
        u = t.strategy.uboot  # type: ignore[attr-defined]
        packed = lzma_alone(data, tmp_path / "payload.lzma")
        assert packed.stat().st_size < len(data) // 4
        comp = board.raw["bootloader"]["kernel_comp_addr_r"]
        assert u.loady_lzma(bl.kernel_addr_r, packed, len(data), comp) == len(data)
        out = u.check(f"crc32 {bl.kernel_addr_r:#x} {len(data):#x}")
    assert out.strip().endswith(f"{zlib.crc32(data):08x}")
    # the profile's loady_baudrate: U-Boot switched for the transfer and back (the prompt
    # answered the crc32 above at the console's rate again)
    log = (tmp_path / "console.log").read_text(errors="replace")
    assert "Switch baudrate to 921600 bps and press ENTER" in log
    assert "Switch baudrate to 115200 bps and press ESC" in log
    assert not leftovers(str(tmp_path))


def test_late_interrupt_on_this_uboot_is_caught_and_retried(tmp_path, monkeypatch):
    """This U-Boot prints "starting USB…"/"scanning bus…" before its countdown (preboot):
    that is not a missed autoboot; coming after the countdown (it scans the card) is, and
    the target power-cycles and interrupts on the second try."""
    from edgevirt.deploy import uboot as uboot_mod

    calls = []
    real = uboot_mod.UBoot.interrupt

    def late(self, abort=None):
        calls.append(1)
        if len(calls) == 1:
            self.console.expect(rb"Hit any key to stop autoboot", 30, abort)
            time.sleep(3.0)  # bootdelay is 2 s: distro boot is already scanning the card
        return real(self, abort)

    monkeypatch.setattr(uboot_mod.UBoot, "interrupt", late)
    with Target(load_board("rpi3b"), DeployOptions(tmp_path, load="sdcard")) as t:
        t.prepare()
        t.transition(State.BOOTLOADER)
        assert t.strategy.attempts == 2 and t.model.boots == 2  # type: ignore[attr-defined]
        assert t.strategy.uboot.run("true").status == 0  # type: ignore[attr-defined]
    log = (tmp_path / "console.log").read_text()
    assert "autoboot missed on attempt 1" in log and "starting USB" in log
    assert not leftovers(str(tmp_path))


def test_boots_from_the_sd_card_with_the_pool_at_the_composed_address(tmp_path):
    """`edgevirt test` builds the card, U-Boot's distro boot runs its boot.scr, the kernel
    creates the restricted-dma-pool where the composer put it on the real BCM2837 tree."""
    t0 = time.monotonic()
    r = edgevirt(
        "test", "carveout", "boot", "--board", "rpi3b", "--load", "sdcard",
        "--build-dir", str(tmp_path), "--json", timeout=300,
    )  # fmt: skip
    seconds = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    steps = [s for suite in res["targets"][0]["suites"] for s in suite["steps"]]
    assert steps and all(s["ok"] for s in steps), steps
    plan = json.loads((tmp_path / "plan.json").read_text())
    (pool,) = [p for p in plan["placed"] if p["kind"] == "carveout"]
    assert steps[0]["detail"] == f"pool at {int(pool['base'], 16):#018x}, 64 MiB"
    log = (tmp_path / "console.log").read_text()
    assert "Found U-Boot script /boot.scr" in log and "edgevirt: booting from mmc 0:1" in log
    assert "if=sd,format=raw" in (tmp_path / "qemu.cmdline").read_text()
    assert seconds < 120, f"SD-card boot + suites took {seconds:.0f}s"
    assert not leftovers(str(tmp_path))


def test_full_boot_over_loady_without_a_card(tmp_path):
    """No card: kernel and initramfs LZMA-compressed over ymodem, lzmadec'd by U-Boot.
    ~36 s on an idle host; the model's UART rate falls with the host's load (see
    boards/rpi3b.toml), hence the wide timeout."""
    board = load_board("rpi3b")
    with Target(board, DeployOptions(tmp_path, load="ymodem", boot_timeout=600)) as t:
        t.prepare()
        t.boot()
        assert t.model is not None and t.model.sd_card is None
        result = run_suite(load_suite("carveout"), t.console, variables=t.vars())
        assert result.ok, [(s.name, s.detail) for s in result.steps]
    log = (tmp_path / "console.log").read_text()
    assert "lzmadec" in log and "Uncompressed size: 7" in log
