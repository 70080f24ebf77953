"""`edgevirt doctor` and the host-requirements table that `scripts/setup-host.sh` installs.

Every probe is exercised both ways: on this host (where `make test` installed everything) it
passes, and with PATH (or the probed file) taken away it fails and names its package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgevirt import hostreqs
from edgevirt.hostreqs import FEATURES, REQUIREMENTS, TARGETS, check, packages
from tests.helpers import ROOT, edgevirt


def test_every_requirement_has_a_known_feature_and_a_package_or_a_fix():
    for r in REQUIREMENTS:
        assert r.feature in FEATURES, r.name
        assert r.package or r.fix, f"{r.name}: neither a package nor a fix"
    for target, features in TARGETS.items():
        assert set(features) <= set(FEATURES), target


def test_setup_installs_exactly_the_table(tmp_path):
    """setup-host.sh reads its list from the table: the script and `packages` agree."""
    for target in TARGETS:
        out = subprocess.run(
            [sys.executable, "-P", str(ROOT / "edgevirt/hostreqs.py"), "packages", target],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert out == packages(target)
        assert len(out) == len(set(out))
    script = (ROOT / "scripts/setup-host.sh").read_text()
    assert "hostreqs.py" in script and "PACKAGES=(" not in script, "no second hand-kept list"
    # make test needs everything make demo needs, plus the test tools.
    assert set(packages("demo")) < set(packages("test"))
    assert "libc6-dev-arm64-cross" in packages("test")
    assert "zstd" in packages("demo")


def test_every_probe_passes_on_this_host():
    missing = [f"{f.req.name}: {f.detail}" for f in check() if not f.ok]
    assert not missing, missing


@pytest.mark.parametrize("req", REQUIREMENTS, ids=lambda r: r.name)
def test_every_probe_can_fail(req, monkeypatch, tmp_path):
    """Without its tools (empty PATH) or its file (chroot-like prefix), each probe fails."""
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no tool is found
    real_is_file = Path.is_file
    monkeypatch.setattr(
        Path, "is_file", lambda p: False if str(p).startswith("/usr") else real_is_file(p)
    )
    monkeypatch.setattr(hostreqs.sys, "executable", str(tmp_path / "no-python"))
    monkeypatch.setattr(hostreqs, "TUN_DEVICE", str(tmp_path / "no-tun"))
    monkeypatch.setattr(
        hostreqs.sysconfig, "get_paths", lambda: {"include": str(tmp_path / "no-include")}
    )
    ok, detail = req.probe()
    assert not ok, f"{req.name} passed without its tools: {detail}"
    assert detail


def test_doctor_names_the_package_and_exits_3_when_a_tool_is_missing(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}
    exe = Path(sys.executable)
    r = subprocess.run(
        [str(exe), "-m", "edgevirt", "doctor", "--feature", "image", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr
    data = json.loads(r.stdout)
    assert not data["ok"]
    by_name = {f["name"]: f for f in data["findings"]}
    assert not by_name["dtc"]["ok"]
    assert by_name["dtc"]["package"] == "device-tree-compiler"
    assert "device-tree-compiler" in data["install"]
    assert "u-boot-tools" in data["install"]
    # The table form says what to install, on stderr, without a traceback.
    r = subprocess.run(
        [str(exe), "-m", "edgevirt", "doctor", "--feature", "image"],
        capture_output=True,
        text=True,
        env={**env, "COLUMNS": "160"},
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 3
    assert "apt-get install" in r.stderr and "device-tree-compiler" in r.stderr
    assert "Traceback" not in r.stderr


def test_doctor_on_this_host_is_green():
    r = edgevirt("doctor", "--json", timeout=120)
    assert r.returncode == 0, r.stdout[-2000:]
    data = json.loads(r.stdout)
    assert data["ok"] and data["install"] == []
    assert {f["feature"] for f in data["findings"]} == set(FEATURES)
