"""The pytest plugin, run the way a user runs it: pytest on a file of device tests."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEVICE_TESTS = """
def test_kernel(edgevirt_console):
    res = edgevirt_console.run("uname -r")
    assert res.status == 0 and res.output.startswith("6.")

def test_same_target_for_the_session(edgevirt_target, edgevirt_console):
    assert edgevirt_target.console is edgevirt_console
    assert edgevirt_console.run("sh -c 'exit 4'").status == 4

def test_without_a_board():
    assert True
"""


def run_pytest(tmp_path, *args, env_board=None):
    (tmp_path / "test_device.py").write_text(DEVICE_TESTS)
    env = {
        "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
        "PYTHONPATH": str(ROOT),
        "HOME": os.environ.get("HOME", "/root"),
    }
    if env_board:
        env["EDGEVIRT_BOARD"] = env_board
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",  # the plugin comes from the installed pytest11 entry point
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            str(tmp_path / "test_device.py"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )


def test_no_board_configured_skips_cleanly(tmp_path):
    r = run_pytest(tmp_path)
    assert r.returncode == 0, r.stdout
    assert "1 passed, 2 skipped" in r.stdout
    assert "no edgevirt board configured" in r.stdout


@pytest.mark.e2e
def test_fixtures_boot_the_board_once(tmp_path):
    build = tmp_path / "build"
    r = run_pytest(tmp_path, "--edgevirt-board", "qemu-virt", "--edgevirt-build-dir", str(build))
    assert r.returncode == 0, r.stdout[-3000:]
    assert "3 passed" in r.stdout
    assert (build / "console.log").read_text().count("EDGEVIRT-AGENT-READY") == 1


@pytest.mark.e2e
def test_board_from_environment_on_the_uboot_board(tmp_path):
    (tmp_path / "conftest.py").write_text("")
    r = run_pytest(tmp_path, "-k", "kernel", env_board="qemu-virt-uboot")
    assert r.returncode == 0, r.stdout[-3000:]
    assert "1 passed" in r.stdout
