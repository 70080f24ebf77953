"""`edgevirt deploy` and `edgevirt console` from the command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def edgevirt(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "edgevirt", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.mark.e2e
def test_deploy_uboot_board_to_its_bootloader(tmp_path):
    r = edgevirt(
        "deploy",
        "--board",
        "qemu-virt-uboot",
        "--state",
        "bootloader",
        "--json",
        "--build-dir",
        str(tmp_path),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert (res["state"], res["strategy"], res["load"]) == ("bootloader", "u-boot", "tftp")
    assert "EVR1 0" in (tmp_path / "console.log").read_text()  # framed U-Boot command ran


@pytest.mark.e2e
def test_deploy_to_a_state_the_strategy_lacks_is_an_error(tmp_path):
    r = edgevirt(
        "deploy", "--board", "qemu-virt", "--state", "bootloader", "--build-dir", str(tmp_path)
    )
    assert r.returncode == 1
    flat = " ".join(r.stderr.split())
    assert "direct boot strategy cannot reach state 'bootloader'" in flat
    assert "off → kernel → shell" in flat


def test_console_of_a_board_without_url_says_what_to_do():
    r = edgevirt("console", "--board", "qemu-virt")
    assert r.returncode == 4
    assert "no url" in r.stderr and "edgevirt deploy -i" in " ".join(r.stderr.split())


def test_console_unreachable_url_fails_clearly(tmp_path):
    r = edgevirt(
        "console",
        "--board",
        "qemu-virt",
        "--url",
        f"unix://{tmp_path}/none.sock",
        "--log",
        str(tmp_path / "c.log"),
    )
    assert r.returncode == 1 and "cannot open unix://" in " ".join(r.stderr.split())
