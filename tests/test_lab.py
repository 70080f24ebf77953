"""Board farms without a board: the optional extra stays optional, exporter configs, the
serial package labgrid's install leaves, and coordinator errors."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from edgevirt.board import load_board
from edgevirt.console.ser2net import Ser2net, free_port
from edgevirt.errors import ConfigError
from edgevirt.lab import coordinator_address
from edgevirt.lab.client import parse_filter
from edgevirt.lab.export import exporter_config, parse_power
from tests.helpers import edgevirt, flat

ROOT = Path(__file__).resolve().parent.parent


def test_core_never_imports_labgrid():
    code = (
        "import sys, edgevirt.cli, edgevirt.deploy.target, edgevirt.suite.session\n"
        "from click.testing import CliRunner\n"
        "CliRunner().invoke(edgevirt.cli.cli, ['test', '--help'])\n"
        "CliRunner().invoke(edgevirt.cli.cli, ['lab', '--help'])\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('labgrid', 'grpc'))\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_coordinator_address_forms(monkeypatch):
    monkeypatch.delenv("LG_COORDINATOR", raising=False)
    assert coordinator_address("lab") == "lab:20408"
    assert coordinator_address("10.1.2.3:3000") == "10.1.2.3:3000"
    monkeypatch.setenv("LG_COORDINATOR", "envhost:1234")
    assert coordinator_address(None) == "envhost:1234"
    with pytest.raises(ConfigError, match="gRPC at HOST:PORT"):
        coordinator_address("ws://lab:20408/ws")
    with pytest.raises(ConfigError, match="port 'x' is not a number"):
        coordinator_address("lab:x")
    monkeypatch.delenv("LG_COORDINATOR")
    with pytest.raises(ConfigError, match="--coordinator"):
        coordinator_address(None)


def test_place_filter_syntax():
    assert parse_filter("rcar-1") is None
    assert parse_filter("board=rcar, lab=2") == {"board": "rcar", "lab": "2"}
    with pytest.raises(ConfigError, match="'lab' is not KEY=VALUE"):
        parse_filter("board=rcar,lab")


def test_exporter_config_for_a_board():
    b = load_board("rpi4b")
    cfg = exporter_config(
        b, "/dev/ttyUSB0", parse_power("simplerest,http://pdu:9/relay/{index}/{value},3")
    )
    assert cfg == {
        "rpi4b": {
            "RawSerialPort": {"port": "/dev/ttyUSB0", "speed": 115200},
            "NetworkPowerPort": {
                "model": "simplerest",
                "host": "http://pdu:9/relay/{index}/{value}",
                "index": 3,
            },
        }
    }
    with pytest.raises(ConfigError, match="only device paths under /dev/"):
        exporter_config(b, "ttyUSB0", None)
    with pytest.raises(ConfigError, match="MODEL,HOST"):
        parse_power("simplerest")
    with pytest.raises(ConfigError, match="INDEX 'x'"):
        parse_power("netio,pdu,x")


def test_lab_export_cli_writes_yaml_the_exporter_accepts(tmp_path):
    pytest.importorskip("labgrid", reason="labgrid extra not installed")
    out = tmp_path / "exports.yaml"
    r = edgevirt(
        "lab",
        "export",
        "--board",
        "renesas-salvator-xs",
        "--serial",
        "/dev/ttyUSB1",
        "--power",
        "netio,pdu.lab,4",
        "--exporter",
        "rack3",
        "--coordinator",
        "lab:20408",
        "-o",
        str(out),
        "--json",
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    data = yaml.safe_load(out.read_text())
    assert data == res["exporter"]
    assert data["renesas-salvator-xs"]["NetworkPowerPort"]["model"] == "netio"
    assert (
        "labgrid-client -x lab:20408 -p renesas-salvator-xs add-match "
        "'rack3/renesas-salvator-xs/*'" in res["commands"]
    )
    # labgrid's own config loader takes it (the exporter's resource classes).
    from labgrid.remote.config import ResourceConfig

    rc = ResourceConfig(str(out))
    assert set(rc.data["renesas-salvator-xs"]) == {"RawSerialPort", "NetworkPowerPort"}
    bad = edgevirt(
        "lab",
        "export",
        "--board",
        "rpi4b",
        "--serial",
        "/dev/ttyUSB0",
        "--power",
        "nosuchpdu,host,0",
    )
    assert bad.returncode == 4
    assert "no such power backend" in flat(bad.stderr) and "simplerest" in bad.stderr


def test_serial_package_after_the_labgrid_install_speaks_rfc2217(tmp_path):
    """labgrid's pyserial fork and pyserial share `serial/`; make setup leaves the fork's
    files (3.5.0.2: pyserial 3.5 + RFC2217 fixes). Prove RFC2217 through ser2net works
    with whatever is installed, both ways over a pty pair."""
    pytest.importorskip("labgrid", reason="labgrid extra not installed")
    import serial

    assert serial.__version__ == "3.5.0.2", "make setup reinstalls pyserial-labgrid last"
    if not shutil.which("socat"):
        pytest.skip("socat missing (make setup installs it)")
    a, b = tmp_path / "a", tmp_path / "b"
    socat = subprocess.Popen(
        ["socat", f"PTY,link={a},raw,echo=0", f"PTY,link={b},raw,echo=0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not (a.exists() and b.exists()) and time.monotonic() < deadline:
            time.sleep(0.05)
        with Ser2net(f"serialdev,{a},115200n81,local", tmp_path) as s2n:
            port = serial.serial_for_url(s2n.url, baudrate=115200, timeout=2)
            fd = os.open(b, os.O_RDWR | os.O_NOCTTY)
            try:
                os.write(fd, b"from the board\n")
                assert port.read(15) == b"from the board\n"
                port.write(b"to the board\n")
                got = b""
                while len(got) < 13:
                    got += os.read(fd, 64)
                assert got == b"to the board\n"
                port.baudrate = 57600  # RFC2217 SET_BAUDRATE reaches ser2net and back
                assert port.baudrate == 57600
            finally:
                os.close(fd)
                port.close()
    finally:
        socat.terminate()
        socat.wait()


def test_unreachable_coordinator_is_a_clear_failure():
    pytest.importorskip("labgrid", reason="labgrid extra not installed")
    addr = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    r = edgevirt("test", "smoke", "--place", "any", "--coordinator", addr, timeout=60)
    assert r.returncode == 1, r.stderr
    assert f"labgrid coordinator {addr} unreachable" in flat(r.stderr)
    assert "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 20
    r = edgevirt("lab", "places", "--coordinator", addr, timeout=60)
    assert r.returncode == 1 and "unreachable" in r.stderr


def test_no_coordinator_is_a_usage_error(monkeypatch):
    env = dict(os.environ)
    env.pop("LG_COORDINATOR", None)
    r = subprocess.run(
        [sys.executable, "-m", "edgevirt", "lab", "places"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )
    assert r.returncode == 4
    assert "--coordinator" in r.stderr


class _Machine:
    """Stands in for QemuMachine: the HTTP layer only needs on/off and the QEMU's liveness."""

    def __init__(self):
        self.qemu = None
        self.calls = []

    def on(self):
        self.calls.append("on")
        self.qemu = type("Q", (), {"alive": lambda self: True})()

    def off(self):
        self.calls.append("off")
        self.qemu = None


def test_fake_pdu_speaks_labgrids_simplerest_protocol():
    """labgrid's own simplerest backend switches the fake PDU's outlets; bad paths and
    unknown outlets get 404 with what was expected."""
    pytest.importorskip("labgrid", reason="labgrid extra not installed")
    import threading
    import urllib.error
    import urllib.request

    from labgrid.driver.power import simplerest

    from edgevirt.lab.fakepdu import FakePdu, Outlet

    pdu = object.__new__(FakePdu)
    machines = {0: _Machine(), 3: _Machine()}
    pdu.outlets = {i: Outlet(i, m) for i, m in machines.items()}
    server = pdu.serve(0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/outlet/{{index}}/{{value}}"
        assert simplerest.power_get(url, None, 3) is False
        simplerest.power_set(url, None, 3, True)
        assert simplerest.power_get(url, None, 3) is True
        assert simplerest.power_get(url, None, 0) is False
        simplerest.power_set(url, None, 3, True)  # already on: QEMU is not restarted
        simplerest.power_set(url, None, 3, False)
        assert machines[3].calls == ["on", "off"] and machines[0].calls == []
        base = url.split("/outlet/")[0]
        for path, want in (
            ("/outlet/7/1", "no outlet 7 (have [0, 3])"),
            ("/relay/0/1", "expected /outlet/<index>[/<0|1>]"),
        ):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(base + path)
            assert e.value.code == 404 and want in e.value.read().decode()
    finally:
        server.shutdown()
        server.server_close()
