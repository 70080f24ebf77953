"""U-Boot path end to end: Debian's u-boot-qemu on QEMU virt as a stand-in board."""

import json
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from edgevirt.board import load_board
from edgevirt.deploy import uboot as uboot_mod
from edgevirt.deploy.strategy import State
from edgevirt.deploy.target import DeployOptions, Target
from edgevirt.errors import ConsoleError
from tests.helpers import leftovers

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


def edgevirt_test(*args: str, timeout: float = 600) -> tuple[int, dict, str]:
    p = subprocess.run(
        [sys.executable, "-m", "edgevirt", "test", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    return p.returncode, json.loads(p.stdout) if p.stdout.startswith("{") else {}, p.stderr


@pytest.mark.parametrize("load", ["tftp", "fit"])
def test_smoke_suite_after_uboot_loads_over_tftp(tmp_path, load):
    code, res, stderr = edgevirt_test(
        "smoke",
        "boot",
        "--board",
        "qemu-virt-uboot",
        "--load",
        load,
        "--build-dir",
        str(tmp_path),
        "--junit",
        str(tmp_path / "j.xml"),
    )
    assert code == 0, stderr[-2000:]
    steps = [s for suite in res["targets"][0]["suites"] for s in suite["steps"]]
    assert len(steps) == 7 and all(s["ok"] for s in steps)
    log = (tmp_path / "console.log").read_text()
    want = "bootm 0x65000000" if load == "fit" else "booti 0x60400000 0x64000000:"
    assert "Hit any key to stop autoboot" in log and want in log
    assert "EDGEVIRT-AGENT-READY" in log and (tmp_path / "j.xml").exists()
    assert not leftovers(str(tmp_path))


def test_ymodem_loady_delivers_the_exact_bytes(tmp_path):
    board = load_board("qemu-virt-uboot")
    payload = tmp_path / "payload.bin"
    payload.write_bytes(os.urandom(20000))
    with Target(board, DeployOptions(tmp_path, load="ymodem")) as t:
        t.prepare()
        t.transition(State.BOOTLOADER)
        u = t.strategy.uboot  # type: ignore[attr-defined]
        assert u.loady(0x66000000, payload) == 20000
        out = u.check(f"crc32 0x66000000 {20000:#x}")
        assert out.strip().endswith(f"{zlib.crc32(payload.read_bytes()):08x}")
        # A DTB over ymodem too: U-Boot parses what arrived.
        u.loady(0x63F00000, t.images.dtb)  # type: ignore[union-attr]
        assert "memory@" in u.check("fdt addr 0x63f00000; fdt list /")
    assert not leftovers(str(tmp_path))


# Measured (2026-11, QEMU 7.2 TCG, 2 cores): ~90 s on an idle host (75 s of it the 7 MiB
# kernel), ~3 min while another test run shares the cores. Each 1 KiB block takes 9-11 ms
# (idle) to 22 ms (loaded) from our write to U-Boot's ACK, while our side turns an ACK into
# the next block in ~10 us: QEMU 7.2's pl011_can_receive() returns 0 or 1, so the chardev
# hands the UART one byte per main-loop iteration (~9 us/byte idle; QEMU 9.x returns the
# free FIFO space). Our sender's own 4.25 s wait per file for a 'C' U-Boot never sends is
# fixed (edgevirt/console/ymodem.py, DATA_C_GRACE).
# It is the slowest test of the suite and runs in it anyway: a board without network has
# only this path, so it must stay proven.
def test_boot_entirely_over_ymodem(tmp_path):
    code, res, stderr = edgevirt_test(
        "boot",
        "--board",
        "qemu-virt-uboot",
        "--load",
        "ymodem",
        "--build-dir",
        str(tmp_path),
        timeout=600,
    )
    assert code == 0, stderr[-2000:]
    log = (tmp_path / "console.log").read_text()
    sizes = [int(n) for n in re.findall(r"## Total Size\s+= 0x[0-9a-f]+ = (\d+) Bytes", log)]
    assert len(sizes) == 3 and sizes[0] > 1 << 20  # kernel, initramfs, DTB, all whole
    assert "Starting kernel" in log and not leftovers(str(tmp_path))


def _late_interrupt(monkeypatch, late_attempts: int) -> list[int]:
    """Fault injection: the first ``late_attempts`` interrupts start after the countdown."""
    import time

    calls = []
    real = uboot_mod.UBoot.interrupt

    def late(self, abort=None):
        calls.append(1)
        if len(calls) <= late_attempts:
            self.console.expect(rb"Hit any key to stop autoboot", 30, abort)
            time.sleep(3.0)  # bootdelay is 2 s
        return real(self, abort)

    monkeypatch.setattr(uboot_mod.UBoot, "interrupt", late)
    return calls


def test_missed_autoboot_is_retried_with_a_power_cycle(tmp_path, monkeypatch):
    calls = _late_interrupt(monkeypatch, 1)
    with Target(load_board("qemu-virt-uboot"), DeployOptions(tmp_path)) as t:
        t.prepare()
        t.transition(State.BOOTLOADER)
        assert t.strategy.attempts == 2 and len(calls) == 2  # type: ignore[attr-defined]
        assert t.machine is not None and t.machine.boots == 2
    assert "autoboot missed on attempt 1" in (tmp_path / "console.log").read_text()


def test_autoboot_missed_every_time_is_a_clear_error(tmp_path, monkeypatch):
    _late_interrupt(monkeypatch, 99)
    with Target(load_board("qemu-virt-uboot"), DeployOptions(tmp_path)) as t:
        t.prepare()
        with pytest.raises(ConsoleError) as ei:
            t.transition(State.BOOTLOADER)
    msg = str(ei.value)
    assert "could not be interrupted in 3 attempts" in msg
    assert "Hit any key to stop autoboot" in msg
    assert not leftovers(str(tmp_path))
