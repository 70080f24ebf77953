"""Board farms end to end: a real labgrid coordinator and exporter (ser2net) on 127.0.0.1,
QEMU boards behind socat pty pairs under /dev, powered by the fake simplerest PDU through
labgrid's NetworkPowerDriver (edgevirt.lab.fakelab). Every test ends with every place free
and every board powered off."""

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest.importorskip("labgrid", reason="labgrid extra missing: pip install 'edgevirt[labgrid]'")

from edgevirt.lab.client import LabClient  # noqa: E402
from edgevirt.lab.fakelab import FakeLab  # noqa: E402
from tests.helpers import edgevirt, flat  # noqa: E402

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent

SLEEPY = """\
name: sleepy
timeout: 60
steps:
  - {name: uname, run: uname -r, match: '^6\\.'}
  - {name: long, run: sleep 30}
  - {name: after, run: echo done}
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with FakeLab(tmp_path_factory.mktemp("lab"), boards=2) as lab:
        yield lab


def outlet_on(lab, i):
    return urllib.request.urlopen(lab.pdu_url.format(index=i, value="")[:-1]).read() == b"1"


def assert_all_free_and_off(lab):
    with LabClient(lab.address) as c:
        for b in lab.boards:
            p = c.place(b.place)
            assert p.state == "free", p
    for b in lab.boards:
        assert not outlet_on(lab, b.outlet), f"outlet {b.outlet} still on"


def lg(lab, *args, user="alice"):
    """labgrid-client as another user of the lab."""
    env = dict(lab.env, LG_USERNAME=user)
    return subprocess.run(
        [str(Path(sys.executable).parent / "labgrid-client"), "-x", lab.address, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def run_bg(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "edgevirt", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def wait_acquired(lab, place, timeout=30):
    with LabClient(lab.address) as c:
        deadline = time.monotonic() + timeout
        while c.place(place).state != "acquired":
            assert time.monotonic() < deadline, f"{place} never acquired"
            time.sleep(0.2)


def lab_opts(lab, build):
    """The options every command run against the test lab takes."""
    return ["--coordinator", lab.address, "--build-dir", str(build)]


def test_smoke_suite_on_a_place_only_the_coordinator_knows(lab, tmp_path):
    place = lab.boards[0].place
    t0 = time.monotonic()
    r = edgevirt(
        "test",
        "smoke",
        "--place",
        place,
        *lab_opts(lab, tmp_path),
        "--json",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    [target] = res["targets"]
    assert target["name"] == place and target["error"] is None
    steps = [s["name"] for s in target["suites"][0]["steps"] if s["ok"]]
    assert steps == ["virtio features", "restricted DMA pool", "blk write/read-back", "hwrng"]
    # the console went through the exporter's ser2net (RFC2217), logged on our side
    log = (tmp_path / "console.log").read_text()
    assert "EDGEVIRT-AGENT-READY" in log
    assert_all_free_and_off(lab)
    print(f"lab smoke: {time.monotonic() - t0:.1f}s, boot {target['boot_seconds']:.1f}s")


def test_parallel_over_tagged_places_one_junit(lab, tmp_path):
    junit = tmp_path / "junit.xml"
    r = edgevirt(
        "test",
        "smoke",
        "--place",
        f"lab={lab.tag}",
        "--parallel",
        "2",
        *lab_opts(lab, tmp_path),
        "--junit",
        str(junit),
        "--json",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    names = sorted(t["name"] for t in json.loads(r.stdout)["targets"])
    assert names == sorted(b.place for b in lab.boards)
    per_place: dict[str, list] = {}
    for c in ET.parse(junit).getroot().iter("testcase"):
        per_place.setdefault(c.get("classname"), []).append(c)
    assert sorted(per_place) == sorted(f"smoke.{b.place}" for b in lab.boards)
    assert all(len(v) == 4 for v in per_place.values()), per_place
    for b in lab.boards:
        assert (tmp_path / b.place / "console.log").is_file()
    assert_all_free_and_off(lab)


def test_place_acquired_by_someone_else_fails_or_waits(lab, tmp_path):
    place = lab.boards[1].place
    assert lg(lab, "-p", place, "acquire").returncode == 0
    try:
        r = edgevirt(
            "test",
            "smoke",
            "--place",
            place,
            *lab_opts(lab, tmp_path),
        )
        assert r.returncode == 1
        msg = flat(r.stderr)
        assert f"place '{place}' acquired by " in msg and "/alice" in msg and "--wait" in msg
        with LabClient(lab.address) as c:  # left alone: still alice's
            assert c.place(place).acquired.endswith("/alice")
        # --wait: queue with a reservation; alice releases after 3 s; we get it.
        threading.Timer(3, lambda: lg(lab, "-p", place, "release")).start()
        t0 = time.monotonic()
        quick = tmp_path / "quick.yaml"
        quick.write_text("name: quick\nsteps:\n  - {name: uname, run: uname -r, match: '^6'}\n")
        r = edgevirt(
            "test",
            str(quick),
            "--place",
            place,
            "--wait",
            "60",
            *lab_opts(lab, tmp_path),
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert time.monotonic() - t0 > 3
        assert "waiting up to 60s" in r.stderr
    finally:
        lg(lab, "-p", place, "release")
    # --wait that runs out: a clear failure, the reservation cancelled
    assert lg(lab, "-p", place, "acquire").returncode == 0
    try:
        r = edgevirt(
            "test",
            "smoke",
            "--place",
            place,
            "--wait",
            "2",
            *lab_opts(lab, tmp_path),
        )
        assert r.returncode == 1
        assert "became free within 2s" in flat(r.stderr)
        with LabClient(lab.address) as c:
            assert c.place(place).reservation is None
    finally:
        lg(lab, "-p", place, "release")
    assert_all_free_and_off(lab)


def test_unknown_place_names_the_places_there_are(lab):
    r = edgevirt("test", "smoke", "--place", "nosuch", "--coordinator", lab.address)
    assert r.returncode == 4
    msg = flat(r.stderr)
    assert "no place matches 'nosuch'" in msg and lab.boards[0].place in msg


def test_terminated_run_releases_and_powers_off(lab, tmp_path):
    """SIGTERM (a CI job cancelled, `timeout`); Ctrl-C: the parallel test below."""
    sig = signal.SIGTERM
    suite = tmp_path / "sleepy.yaml"
    suite.write_text(SLEEPY)
    place = lab.boards[0].place
    p = run_bg(
        "test",
        str(suite),
        "--place",
        place,
        *lab_opts(lab, tmp_path),
    )
    wait_acquired(lab, place)
    deadline = time.monotonic() + 60
    while not outlet_on(lab, 0) or "sleep 30" not in (tmp_path / "console.log").read_text():
        assert time.monotonic() < deadline and p.poll() is None, p.stderr.read()[-2000:]
        time.sleep(0.2)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err[-2000:]
    assert "every place released" in err
    assert_all_free_and_off(lab)


def test_interrupted_parallel_run_releases_every_place(lab, tmp_path):
    suite = tmp_path / "sleepy.yaml"
    suite.write_text(SLEEPY)
    p = run_bg(
        "test",
        str(suite),
        "--place",
        f"lab={lab.tag}",
        "--parallel",
        "2",
        *lab_opts(lab, tmp_path),
    )
    logs = [tmp_path / b.place / "console.log" for b in lab.boards]
    deadline = time.monotonic() + 60
    while not all(log.exists() and "sleep 30" in log.read_text() for log in logs):
        assert time.monotonic() < deadline and p.poll() is None, p.stderr.read()[-2000:]
        time.sleep(0.2)
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err[-2000:]
    assert time.monotonic() - t0 < 15  # not the 30 s the boards were busy for
    assert_all_free_and_off(lab)


def test_place_taken_away_mid_run_is_named_and_left_to_its_new_owner(lab, tmp_path):
    suite = tmp_path / "sleepy.yaml"
    suite.write_text(SLEEPY)
    place = lab.boards[1].place
    p = run_bg(
        "test",
        str(suite),
        "--place",
        place,
        *lab_opts(lab, tmp_path),
        "--json",
    )
    deadline = time.monotonic() + 60
    while "sleep 30" not in (
        (tmp_path / "console.log").read_text() if (tmp_path / "console.log").exists() else ""
    ):
        assert time.monotonic() < deadline and p.poll() is None, p.stderr.read()[-2000:]
        time.sleep(0.2)
    try:
        assert lg(lab, "-p", place, "release", "--kick").returncode == 0
        assert lg(lab, "-p", place, "acquire").returncode == 0
        out, err = p.communicate(timeout=60)
        assert p.returncode == 1, err[-2000:]
        [target] = json.loads(out)["targets"]
        msg = target["error"] or target["suites"][0]["error"]
        assert f"place '{place}' was taken away from us (now " in msg, msg
        with LabClient(lab.address) as c:  # alice keeps it: we did not release hers
            assert c.place(place).acquired.endswith("/alice")
    finally:
        lg(lab, "-p", place, "release")
    assert not outlet_on(lab, 1)  # our power-off still went through the PDU
    assert_all_free_and_off(lab)


def test_failing_suite_and_timeout_release_the_place(lab, tmp_path):
    suite = tmp_path / "bad.yaml"
    suite.write_text(
        "name: bad\nsteps:\n"
        "  - {name: fails, run: 'false'}\n"
        "  - {name: too slow, run: sleep 20, timeout: 1}\n"
    )
    r = edgevirt(
        "test",
        str(suite),
        "--place",
        lab.boards[0].place,
        *lab_opts(lab, tmp_path),
        "--json",
    )
    assert r.returncode == 1
    steps = json.loads(r.stdout)["targets"][0]["suites"][0]["steps"]
    assert [s["ok"] for s in steps] == [False, False]
    assert_all_free_and_off(lab)


@pytest.mark.parametrize("what", ["exporter", "serial", "coordinator"])
def test_exporter_serial_port_or_coordinator_gone_mid_run(tmp_path, lab, what):
    """A lab of its own (this breaks it): the failure names the place and the resource,
    the place is released (or, with the coordinator gone, the command says it could not
    and how to), the board powered off (the PDU is reachable without the exporter:
    labgrid's driver runs here)."""
    image = lab.workdir / "pdu" / "outlet-0"
    suite = tmp_path / "sleepy.yaml"
    suite.write_text(SLEEPY)
    with FakeLab(tmp_path / "lab", boards=1, image_dir=image) as lab1:
        place = lab1.boards[0].place
        p = run_bg(
            "test",
            str(suite),
            "--place",
            place,
            *lab_opts(lab1, tmp_path / "out"),
            "--json",
        )
        log = tmp_path / "out" / "console.log"
        deadline = time.monotonic() + 60
        while not (log.exists() and "sleep 30" in log.read_text()):
            assert time.monotonic() < deadline and p.poll() is None, p.stderr.read()[-2000:]
            time.sleep(0.2)
        lab1.stop({"exporter": "exporter", "serial": "socat-0"}.get(what, what))
        out, err = p.communicate(timeout=90)
        assert p.returncode == 1, err[-3000:]
        assert out.strip(), err[-3000:]
        [target] = json.loads(out)["targets"]
        assert not outlet_on(lab1, 0)
        if what == "coordinator":
            step = target["suites"][0]["steps"][1]
            assert step["outcome"] == "error"
            assert f"place '{place}': lost the connection to coordinator" in step["detail"]
            assert f"cannot release place '{place}'" in target["error"]
            assert f"labgrid-client -x {lab1.address} -p {place} release" in target["error"]
            return
        broken = [s for s in target["suites"][0]["steps"] if s["outcome"] == "error"]
        msg = target["error"] or target["suites"][0]["error"]
        assert broken and msg.split(" — ")[0] in broken[0]["detail"]
        assert f"place '{place}'" in msg, (out + err)[-3000:]
        assert "NetworkSerialPort/RawSerialPort" in msg, msg
        print(f"{what} gone: {msg.splitlines()[0]}")
        assert "Traceback" not in err
        with LabClient(lab1.address) as c:
            assert c.place(place).state == "free"
        assert not outlet_on(lab1, 0)


def test_deploy_on_a_place_then_released(lab, tmp_path):
    place = lab.boards[1].place
    r = edgevirt(
        "deploy",
        "--place",
        place,
        *lab_opts(lab, tmp_path),
        "--json",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["place"] == place and res["state"] == "shell" and res["strategy"] == "direct"
    assert "EDGEVIRT-AGENT-READY" in (tmp_path / "console.log").read_text()
    assert_all_free_and_off(lab)


def test_interactive_console_on_a_place(lab, tmp_path):
    place = lab.boards[0].place
    log = tmp_path / "console.log"
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgevirt",
            "console",
            "--place",
            place,
            "--power-on",
            "--coordinator",
            lab.address,
            "--log",
            str(log),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )

    def wait_log(text):
        deadline = time.monotonic() + 60
        while not (log.exists() and text in log.read_text()):
            assert time.monotonic() < deadline and p.poll() is None, p.stderr.read()[-2000:]
            time.sleep(0.2)

    wait_log("EDGEVIRT-AGENT-READY")
    p.stdin.write(b"echo lab-$((40 + 2))\n")
    p.stdin.flush()
    wait_log("lab-42")
    p.stdin.write(b"\x1d")
    p.stdin.flush()
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err.decode()[-2000:]
    assert b"lab-42" in out
    assert_all_free_and_off(lab)


def test_uboot_board_on_a_place_loads_from_the_labs_tftp_dir(tmp_path, lab):
    """A U-Boot board behind the lab: autoboot stopped over the exporter's RFC2217 port,
    the images staged into the lab's TFTP directory ([tftp] dir, what QEMU's user network
    serves for outlet 0), loaded by U-Boot, then the suites."""
    labdir = tmp_path / "lab"
    tftp = labdir / "pdu" / "outlet-0" / "tftp"
    board = tmp_path / "lab-uboot.toml"
    text = (ROOT / "boards" / "qemu-virt-uboot.toml").read_text()
    board.write_text(text.replace('server = "qemu"', f'server = "qemu"\ndir = "{tftp}"', 1))
    built = lab.workdir / "pdu" / "outlet-0"  # kernel and initramfs the other lab built
    with FakeLab(labdir, boards=1, board=str(board), image_dir=built) as lab1:
        image = tmp_path / "image"  # what a user brings: kernel, initramfs, that machine's DTB
        image.mkdir()
        for f in (
            built / "Image",
            built / "initramfs.cpio.gz",
            labdir / "pdu" / "outlet-0" / "guest.dtb",
        ):
            (image / f.name).symlink_to(f)
        for f in tftp.iterdir():  # only what edgevirt stages may be there
            f.unlink()
        place = lab1.boards[0].place
        r = edgevirt(
            "test",
            "smoke",
            "--place",
            place,
            "--board",
            str(board),
            "--image",
            str(image),
            *lab_opts(lab1, tmp_path / "out"),
            "--json",
        )
        assert r.returncode == 0, r.stderr[-3000:]
        [target] = json.loads(r.stdout)["targets"]
        steps = [s for suite in target["suites"] for s in suite["steps"]]
        assert len(steps) == 4 and all(s["ok"] for s in steps)
        log = (tmp_path / "out" / "console.log").read_text()
        assert "Hit any key to stop autoboot" in log and "booti 0x60400000 0x64000000:" in log
        assert sorted(f.name for f in tftp.iterdir()) == ["Image", "guest.dtb", "initramfs.cpio.gz"]
        with LabClient(lab1.address) as c:
            assert c.place(place).state == "free"
        assert not outlet_on(lab1, 0)
        print(f"u-boot place: boot {target['boot_seconds']:.1f}s")


def test_pytest_plugin_on_a_place(lab, tmp_path):
    """Device tests in pytest on a place: fixtures from the plugin, place held for the
    session and released after it."""
    (tmp_path / "test_device.py").write_text(
        "def test_kernel(edgevirt_console):\n"
        "    res = edgevirt_console.run('uname -r')\n"
        "    assert res.status == 0 and res.output.startswith('6.')\n"
    )
    place = lab.boards[0].place
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(tmp_path / "test_device.py"),
            "--edgevirt-place",
            place,
            "--edgevirt-coordinator",
            lab.address,
            "--edgevirt-build-dir",
            str(tmp_path / "b"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "1 passed" in r.stdout
    assert_all_free_and_off(lab)
