"""`edgevirt backend run --json` and `edgevirt backend status` as a user runs them."""

import json
import os
import signal
import subprocess
import sys

from click.testing import CliRunner

from edgevirt.backend.devices import blk as b
from edgevirt.backend.transport.vhost_user.frontend import VhostUserFrontend
from edgevirt.cli import cli


def test_run_json_ready_line_traffic_then_sigterm_final_stats(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    stats = tmp_path / "stats.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgevirt", "backend", "run", "--json",
         "--device", f"blk:path={disk},queues=2", "--device", "rng",
         "--socket-dir", str(tmp_path / "s"), "--stats", str(stats)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["event"] == "ready" and set(ready["sockets"]) == {"blk", "rng"}
        fe = VhostUserFrontend(ready["sockets"]["blk"])
        fe.negotiate()
        fe.set_mem_table()
        fe.setup_vring(1)
        fe.vrings[1].driver.add([b.REQ_HEADER.pack(b.T_OUT, 0, 0), b"q" * 512], [1])
        fe.kick(1)
        assert fe.wait_call(1)
        fe.close()
        os.kill(proc.pid, signal.SIGTERM)
        rest, errout = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, errout
    final = json.loads(rest)
    blk = final["devices"][0]
    assert blk["device"] == "blk" and blk["requests"] == 1 and blk["bytes_read"] == 512
    assert [q["served"] for q in blk["queues"]] == [0, 1]
    assert final["running"] is False
    assert disk.read_bytes()[:512] == b"q" * 512
    # The stats file keeps the last counters for observers.
    assert json.loads(stats.read_text())["devices"][0]["requests"] == 1
    r = CliRunner().invoke(cli, ["backend", "status", str(stats)])
    assert r.exit_code == 0
    assert "queues" in r.output and "blk" in r.output and "rng" in r.output
    r = CliRunner().invoke(cli, ["backend", "status", "--json", str(stats)])
    assert json.loads(r.output)["devices"][1]["device"] == "rng"


def test_run_bad_device_is_config_error(tmp_path):
    r = CliRunner().invoke(
        cli, ["backend", "run", "--device", "blk:path=x,queues=zero", "--socket-dir", str(tmp_path)]
    )
    assert r.exit_code == 4
    r = CliRunner().invoke(
        cli, ["backend", "run", "--device", "floppy", "--socket-dir", str(tmp_path)]
    )
    assert r.exit_code == 4


def test_status_of_missing_or_foreign_file(tmp_path):
    assert CliRunner().invoke(cli, ["backend", "status", str(tmp_path / "no")]).exit_code == 3
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert CliRunner().invoke(cli, ["backend", "status", str(bad)]).exit_code == 4
