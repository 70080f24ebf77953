"""Several QEMU targets at once: own build dirs and ports, one merged JUnit file."""

import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


def test_one_suite_on_three_targets_with_merged_junit(tmp_path):
    t0 = time.monotonic()
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgevirt",
            "test",
            "smoke",
            "--parallel",
            "3",
            "--json",
            "--build-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    elapsed = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout)
    names = [t["name"] for t in res["targets"]]
    assert names == ["qemu-virt-0", "qemu-virt-1", "qemu-virt-2"]
    assert len({t["build"] for t in res["targets"]}) == 3
    for t in res["targets"]:
        assert t["error"] is None and all(s["ok"] for s in t["suites"][0]["steps"])
        assert "EDGEVIRT-AGENT-READY" in (Path(t["build"]) / "console.log").read_text()
    root = ET.parse(res["junit"]).getroot()
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == [f"smoke@{n}" for n in names]
    assert root.get("tests") == "12" and root.get("failures") == "0"
    print(f"3 targets in {elapsed:.1f}s")
