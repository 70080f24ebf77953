"""Remote console: Debian's real ser2net exports QEMU's serial port over RFC2217 on loopback."""

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edgevirt.board import load_board
from edgevirt.deploy.target import DeployOptions, Target
from edgevirt.suite.model import parse_suite
from edgevirt.suite.runner import run_suite
from tests.helpers import leftovers

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


def test_smoke_suite_over_rfc2217(tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgevirt",
            "test",
            "smoke",
            "--ser2net",
            "--json",
            "--build-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout)
    assert res["ok"] and len(res["targets"][0]["suites"][0]["steps"]) == 4
    config = next(tmp_path.glob("ser2net-*.yaml")).read_text()
    assert "telnet(rfc2217),tcp,127.0.0.1," in config and "serialdev,/dev/pts/" in config
    assert "EDGEVIRT-AGENT-READY" in (tmp_path / "console.log").read_text()
    assert not leftovers(str(tmp_path))


def test_ser2net_dropping_mid_command_is_a_clear_error(tmp_path):
    suite = parse_suite(
        "steps: [{name: long, run: 'sleep 8', timeout: 20}, {name: after, run: 'true'}]",
        tmp_path / "s.yaml",
    )
    with Target(load_board("qemu-virt"), DeployOptions(tmp_path, ser2net=True)) as t:
        console = t.boot()
        assert console.port.name.startswith("rfc2217://127.0.0.1:")
        s2n = t.machine.ser2net  # type: ignore[union-attr]
        threading.Timer(1.0, lambda: s2n.proc.send_signal(signal.SIGKILL)).start()
        r = run_suite(suite, console, abort=t.strategy.abort)
    assert r.steps[0].outcome == "error"
    assert "disconnected" in r.steps[0].detail, r.steps[0].detail
    assert r.steps[1].outcome == "skipped"
    # The log is kept and the target is off.
    assert "run #1: sleep 8" in (tmp_path / "console.log").read_text()
    assert not leftovers(str(tmp_path))
