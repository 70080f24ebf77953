"""Faults while deploying and testing: each one ends clearly, and nothing is left running."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgevirt.board import load_board
from edgevirt.deploy.target import DeployOptions, Target
from edgevirt.suite.model import parse_suite
from edgevirt.suite.runner import run_suite
from tests.helpers import leftovers

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


def test_qemu_dying_mid_command_is_reported_with_its_stderr(tmp_path):
    suite = parse_suite(
        "steps: [{name: long, run: 'sleep 8', timeout: 20}, {name: after, run: 'true'}]",
        tmp_path / "s.yaml",
    )
    with Target(load_board("qemu-virt"), DeployOptions(tmp_path)) as t:
        console = t.boot()
        qemu = t.machine.qemu  # type: ignore[union-attr]
        threading.Timer(1.0, lambda: os.kill(qemu.pid, signal.SIGTERM)).start()
        r = run_suite(suite, console, abort=t.strategy.abort)
    detail = r.steps[0].detail
    assert r.steps[0].outcome == "error"
    assert "QEMU exited with status" in detail and "terminating on signal 15" in detail, detail
    assert r.steps[1].outcome == "skipped"
    assert not leftovers(str(tmp_path))


def test_silent_console_times_out_with_the_last_lines(tmp_path):
    suite = tmp_path / "silent.yaml"
    suite.write_text(
        "steps:\n  - {name: prompt, expect: 'login: ', timeout: 1}\n  - {name: next, run: 'true'}\n"
    )
    p = subprocess.run(
        [sys.executable, "-m", "edgevirt", "test", str(suite), "--build-dir", str(tmp_path / "b")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    flat = " ".join(p.stdout.split())
    assert p.returncode == 1
    assert "ERROR" in flat and "SKIP" in flat
    assert "did not appear within 1s" in flat and "EDGEVIRT-AGENT-READY" in flat
    junit = (tmp_path / "b" / "junit.xml").read_text()
    assert "<error" in junit and "<skipped" in junit
    assert not leftovers(str(tmp_path))


def test_ctrl_c_stops_everything(tmp_path):
    build = tmp_path / "b"
    suite = tmp_path / "long.yaml"
    suite.write_text("steps: [{name: long, run: 'sleep 60', timeout: 120}]\n")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgevirt",
            "test",
            str(suite),
            "--parallel",
            "2",
            "--build-dir",
            str(build),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    logs = [build / f"qemu-virt-{i}" / "console.log" for i in range(2)]
    deadline = time.monotonic() + 120
    while not all(p.exists() and "run #1" in p.read_text() for p in logs):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    assert len(leftovers(str(build))) >= 4  # two QEMUs and two back-ends running
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert time.monotonic() - t0 < 15
    assert "interrupted" in err
    assert not leftovers(str(build))
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"edgevirt-{proc.pid}-")]


def test_reboot_step_power_cycles_back_to_the_shell(tmp_path):
    suite = tmp_path / "reboot.yaml"
    suite.write_text(
        "steps:\n"
        "  - {name: mark, run: 'echo 1 > /tmp/booted; cat /tmp/booted'}\n"
        "  - {name: power cycle, reboot: true}\n"
        "  - {name: fresh tmpfs, run: 'test ! -e /tmp/booted'}\n"
    )
    p = subprocess.run(
        [sys.executable, "-m", "edgevirt", "test", str(suite), "--build-dir", str(tmp_path / "b")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert (tmp_path / "b" / "console.log").read_text().count("EDGEVIRT-AGENT-READY") == 2
    assert not leftovers(str(tmp_path))
