"""`edgevirt up --spec` with devices beyond blk and rng: which specs it accepts, how the
QEMU machine wires each device's smoke checks, what the service VM's back-end gets for
them, and the far-end programs (edgevirt.devpeer) on real sockets (no VM boots here)."""

import hashlib
import json
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edgevirt import devpeer
from edgevirt.board import load_board
from edgevirt.deploy.machine import QemuMachine
from edgevirt.devsmoke import SMOKES, FarEnd, device_smoke
from edgevirt.devsmoke.console import port_devices
from edgevirt.errors import ConfigError, SetupError
from edgevirt.spec import load_spec
from tests.helpers import ROOT, edgevirt

DEVICES_SPEC = ROOT / "devicetree/specs/qemu-virt-devices.toml"
DEVICES_MSG_SPEC = ROOT / "devicetree/specs/qemu-virt-devices-msg.toml"
DEVICES_SVM_SPEC = ROOT / "devicetree/specs/qemu-virt-devices-svm.toml"
#: QEMU 7.2 has no vhost-user console front-end: the vhost-user spec has the others.
VHOST_USER_SMOKES = sorted(set(SMOKES) - {"console"})


def spec_file(tmp_path: Path, devices: str, extra: str = "") -> Path:
    p = tmp_path / "spec.toml"
    p.write_text(
        'name = "t"\n[[carveout]]\nname = "shared"\nsize = "64M"\n'
        f"{extra}\n"
        '[[device]]\ntype = "blk"\ntransport = "mmio"\n'
        '[[device]]\ntype = "rng"\ntransport = "mmio"\n' + devices
    )
    return p


def up(tmp_path: Path, spec: Path, *extra: str):
    return edgevirt("up", "--spec", str(spec), "--build-dir", str(tmp_path / "b"), *extra)


def test_unknown_device_option_is_exit_4_naming_it(tmp_path):
    spec = spec_file(tmp_path, '[[device]]\ntype = "net"\ntransport = "mmio"\nspeed = "10G"\n')
    r = up(tmp_path, spec)
    assert r.returncode == 4, r.stderr
    assert "[[device]][2]" in r.stderr and "speed" in r.stderr, r.stderr
    assert not (tmp_path / "b").exists()  # refused before anything was built


def test_device_up_cannot_check_is_exit_4(tmp_path):
    spec = spec_file(tmp_path, '[[device]]\ntype = "sound"\ntransport = "mmio"\n')
    r = up(tmp_path, spec)
    assert r.returncode == 4 and "sound" in r.stderr, r.stderr
    assert "net, vsock, console, gpio, i2c" in r.stderr, r.stderr


def test_smoke_device_twice_is_exit_4(tmp_path):
    dev = '[[device]]\ntype = "gpio"\ntransport = "mmio"\n'
    r = up(tmp_path, spec_file(tmp_path, dev + dev))
    assert r.returncode == 4 and "one gpio device" in r.stderr, r.stderr


def test_console_over_vhost_user_is_exit_4_naming_qemu(tmp_path):
    spec = spec_file(tmp_path, '[[device]]\ntype = "console"\ntransport = "mmio"\n')
    r = up(tmp_path, spec)
    assert r.returncode == 4, r.stderr
    assert "QEMU 7.2 has no vhost-user console front-end" in r.stderr, r.stderr


def test_service_vm_spec_resolves_to_msg_with_every_device(tmp_path):
    from edgevirt.up import UpOptions, resolve

    transport, backend, spec = resolve(UpOptions(tmp_path, spec=DEVICES_SVM_SPEC),
                                       load_board("qemu-virt"))  # fmt: skip
    assert (transport, backend) == ("msg", "service-vm")
    assert spec is not None
    assert [d.type for d in spec.devices] == ["blk", "rng", *SMOKES]
    with pytest.raises(ConfigError, match="contradicts the spec's backend service-vm"):
        resolve(UpOptions(tmp_path, spec=DEVICES_SVM_SPEC, backend="host"),
                load_board("qemu-virt"))  # fmt: skip


def test_service_vm_back_end_gets_each_smokes_device_and_peripherals(tmp_path):
    """The service VM's peer configuration, from the front-end machine's smokes: devices in
    bus order (the front-end's DT numbers them the same), the far side inside the VM."""
    from edgevirt.servicevm.up import ServiceVmBackend, peer_config
    from edgevirt.up import UpOptions

    board = load_board("qemu-virt")
    spec = load_spec(DEVICES_SVM_SPEC)
    m = QemuMachine(board, tmp_path / "fe", transport="msg", spec=spec)
    svm = ServiceVmBackend(board, tmp_path, UpOptions(tmp_path, spec=DEVICES_SVM_SPEC))
    svm.frontend(m)
    assert svm.devices == ("blk", "rng", "net", "vsock", "console", "gpio", "i2c")
    cfg = peer_config(board, svm.devices, svm.smokes)
    assert cfg.devices == [
        "blk:path=/dev/vda", "rng", "net:tap=ev0", "vsock:cid=3,dir=/run/edgevirt/vsock",
        "console:ports=log!+ctl,dir=/run/edgevirt/console",
        "gpio:lines=led+button,chip=ev-gpio",
        "i2c:bus=SMBus stub driver,allow=0x48+0x50",
    ]  # fmt: skip
    assert cfg.peripherals == {"gpio_sim": {"label": "ev-gpio", "lines": ["led", "button"]},
                               "i2c_stub": {"addresses": [0x48, 0x50, 0x51]}}  # fmt: skip
    # every string is one the service VM's back-end accepts, and the config round-trips
    from edgevirt.backend.devices import parse_device
    from edgevirt.servicevm import peripherals
    from edgevirt.servicevm.peer import parse_config

    assert parse_config(cfg.to_json()).devices == cfg.devices
    peripherals.check(cfg.peripherals, "t")
    d = parse_device(cfg.devices[3].replace("/run/edgevirt", str(tmp_path / "run")))
    d.close()
    # until a service VM runs, a smoke has no far side: one failed check, nothing driven
    assert all(sm.in_service_vm and sm.service is None for sm in svm.smokes.values())
    [c] = svm.smokes["net"].checks(None, "front-end: ")  # type: ignore[arg-type]
    assert (c.name, c.ok) == ("front-end: net checks", False) and "no service VM" in c.detail
    # without smokes (no spec) the service VM serves blk and rng, no peripherals
    assert peer_config(board).devices == ["blk:path=/dev/vda", "rng"]
    assert peer_config(board).peripherals == {}
    m.close()


def test_readme_gpio_i2c_snippet_is_what_up_writes(tmp_path):
    """The README's service-VM JSON (lending a GPIO line and an I2C device) is the devices and
    peripherals `up` gives the service VM's back-end for gpio + i2c."""
    from edgevirt.servicevm.up import peer_config

    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Lending a GPIO line and an I2C device") :]
    snippet = re.search(r"```json\n(.*?)```", section, re.S)
    assert snippet is not None
    shown = json.loads("{" + snippet.group(1) + "}")
    smokes = {t: device_smoke(t, tmp_path) for t in ("gpio", "i2c")}
    cfg = peer_config(load_board("qemu-virt"), ["gpio", "i2c"], smokes).to_json()
    assert shown == {"devices": cfg["devices"], "peripherals": cfg["peripherals"]}


def test_machine_wires_each_device_to_its_smoke(tmp_path):
    spec = load_spec(DEVICES_SPEC)
    m = QemuMachine(load_board("qemu-virt"), tmp_path, spec=spec)
    kinds = [d.kind for d in m.config.devices]
    assert kinds == ["vhost-user-blk", "vhost-user-rng", "virtio-net-device",
                     "vhost-user-vsock-device", "vhost-user-gpio-device",
                     "vhost-user-i2c-device"]  # fmt: skip
    assert sorted(m.smokes) == VHOST_USER_SMOKES
    args = [m._backend_arg(n) for n in m.device_names]
    assert args[0].startswith("blk:path=") and args[1] == "rng"
    assert args[2].startswith("net:tap=evtap0,netns=evup")
    assert args[3] == f"vsock:cid=3,dir={tmp_path / 'vsock-smoke'}"
    assert args[4].startswith("gpio:lines=led+button,ctl=")
    assert "allow=0x48+0x50" in args[5] and "eeprom_file=" in args[5]
    assert m.config.devices[2].options == {"mac": "52:54:00:12:34:56"}
    m.close()  # nothing was created: closing is harmless
    assert device_smoke("blk", tmp_path) is None


def test_msg_machine_starts_no_vhost_user_devices_but_keeps_the_smokes(tmp_path):
    spec = load_spec(DEVICES_MSG_SPEC)
    m = QemuMachine(load_board("qemu-virt"), tmp_path, transport="msg", spec=spec)
    assert m.config.devices == [] and sorted(m.smokes) == sorted(SMOKES)
    m.close()


def test_net_smoke_without_root_is_a_setup_error(tmp_path, monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    smoke = device_smoke("net", tmp_path)
    assert smoke is not None
    with pytest.raises(SetupError, match="need root"):
        smoke.before_backend()
    smoke.close()  # created nothing, removes nothing


def test_console_port_names_from_sysfs_listing():
    listing = "vport1p0 log\nvport1p1 ctl\nnot a port\n"
    assert port_devices(listing) == {"log": "vport1p0", "ctl": "vport1p1"}
    assert port_devices("") == {}


def test_devpeer_result_lines():
    sha = "a" * 64
    assert devpeer.parse(f"listening\ngot 5 {sha}\n", "got") == (5, sha)
    assert devpeer.parse(f"got 5 {sha}", "sent") is None
    assert devpeer.parse("got five " + sha, "got") is None
    assert devpeer.parse("got 5 abc", "got") is None


def test_far_end_tcp_both_ways_on_loopback(tmp_path):
    """recv and send as host processes (what the net smoke runs in its namespace)."""
    smoke = device_smoke("vsock", tmp_path)  # any smoke: FarEnd only asks where it runs
    assert smoke is not None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    far = FarEnd(smoke, "recv", "127.0.0.1", port, 300_000, timeout=30)
    data = bytes(range(256)) * 1200
    for _ in range(100):
        try:
            c = socket.create_connection(("127.0.0.1", port), timeout=1)
            break
        except OSError:
            threading.Event().wait(0.1)
    with c:
        c.sendall(data[:300_000])
    assert devpeer.parse(far.output(), "got") == (
        300_000,
        hashlib.sha256(data[:300_000]).hexdigest(),
    )
    lsn = socket.socket()
    lsn.bind(("127.0.0.1", 0))
    lsn.listen(1)
    with lsn:
        far = FarEnd(smoke, "send", "127.0.0.1", lsn.getsockname()[1], 70_000, timeout=30)
        c, _ = lsn.accept()
        got = b""
        with c:
            while b := c.recv(65536):
                got += b
    assert devpeer.parse(far.output(), "sent") == (70_000, hashlib.sha256(got).hexdigest())


def test_far_end_unix_serve_and_talk(tmp_path):
    """serve (a vsock port's host side) and talk (a console port's) on real unix sockets."""
    smoke = device_smoke("console", tmp_path)
    assert smoke is not None
    path = tmp_path / "vsock_5000"
    far = FarEnd(smoke, "serve", path, 4096, timeout=30)
    for _ in range(100):
        if path.exists():
            break
        threading.Event().wait(0.05)
    with socket.socket(socket.AF_UNIX) as c:
        for _ in range(100):
            try:
                c.connect(str(path))
                break
            except OSError:
                threading.Event().wait(0.05)
        c.sendall(b"x" * 1000)
        c.shutdown(socket.SHUT_WR)
        back = b""
        while b := c.recv(65536):
            back += b
    out = far.output()
    assert devpeer.parse(out, "got") == (1000, hashlib.sha256(b"x" * 1000).hexdigest())
    assert devpeer.parse(out, "sent") == (4096, hashlib.sha256(back).hexdigest())
    # talk: connects, sends its text, takes SIZE bytes
    sock = tmp_path / "ctl.sock"
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(str(sock))
        srv.listen(1)
        far = FarEnd(smoke, "talk", sock, "hello-port", 3000, timeout=30)
        c, _ = srv.accept()
        with c:
            got = b""
            while len(got) < len("hello-port"):
                got += c.recv(64)
            c.sendall(b"y" * 3000)
    assert got == b"hello-port"
    assert devpeer.parse(far.output(), "got") == (3000, hashlib.sha256(b"y" * 3000).hexdigest())
    # a far end that cannot connect ends with exit 1 and says why
    far = FarEnd(smoke, "talk", tmp_path / "nobody.sock", "x", 1, timeout=5)
    assert "devpeer talk:" in far.output() and far.proc is not None and far.proc.returncode == 1


def test_far_end_connect_opens_a_stream_through_the_hybrid_handshake(tmp_path):
    """connect (the host-opened vsock stream): against a fake back-end on a real unix socket
    that refuses the first CONNECT (no guest listener yet: closed without a line), then
    answers OK, sends the guest's data right behind the OK line and reads the answer."""
    smoke = device_smoke("vsock", tmp_path)
    assert smoke is not None
    path = tmp_path / "vsock"
    guest = bytes(range(256)) * 400
    seen: dict[str, object] = {"lines": []}

    def line(c: socket.socket) -> bytes:
        got = b""
        while not got.endswith(b"\n"):
            got += c.recv(1)
        return got

    def fake_backend(srv: socket.socket) -> None:
        c, _ = srv.accept()
        seen["lines"].append(line(c))
        c.close()  # refused: the far end must retry
        c, _ = srv.accept()
        with c:
            seen["lines"].append(line(c))
            c.sendall(b"OK 1073741824\n" + guest)  # data may follow the OK line at once
            c.shutdown(socket.SHUT_WR)
            back = b""
            while b := c.recv(65536):
                back += b
            seen["back"] = back

    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(str(path))
        srv.listen(1)
        t = threading.Thread(target=fake_backend, args=(srv,), daemon=True)
        t.start()
        far = FarEnd(smoke, "connect", path, 6000, 5000, timeout=30)
        out = far.output()
        t.join(10)
    assert seen["lines"] == [b"CONNECT 6000\n", b"CONNECT 6000\n"]
    assert "connected 1073741824" in out.splitlines()
    assert devpeer.parse(out, "got") == (len(guest), hashlib.sha256(guest).hexdigest())
    back = seen["back"]
    assert isinstance(back, bytes) and len(back) == 5000
    assert devpeer.parse(out, "sent") == (5000, hashlib.sha256(back).hexdigest())
    # a back-end that rejects the line: exit 1 at once, quoting its answer
    path.unlink()
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(str(path))
        srv.listen(1)
        far = FarEnd(smoke, "connect", path, 6000, 1, timeout=30)
        c, _ = srv.accept()
        with c:
            line(c)
            c.sendall(b"ERR expected 'CONNECT <port>\\n'\n")
        out = far.output()
    assert far.proc is not None and far.proc.returncode == 1
    assert "devpeer connect:" in out and "refused the handshake" in out and "ERR" in out
    # nobody listens on the socket at all: it gives up after its timeout, exit 1
    path.unlink()
    far = FarEnd(smoke, "connect", path, 6000, 1, timeout=1)
    out = far.output()
    assert far.proc is not None and far.proc.returncode == 1
    assert "no guest accepted port 6000" in out


def test_far_end_ctrl_c_is_a_normal_exit_130(tmp_path):
    """SIGINT (Ctrl-C on the service VM's shell) ends a far end with exit status 130, not by
    the signal: a shell whose job died of SIGINT drops the rest of the command line."""
    path = tmp_path / "probe"
    p = subprocess.Popen([sys.executable, "-m", "edgevirt.devpeer", "serve", str(path), "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert p.stdout is not None and p.stdout.readline() == "listening\n"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=10)
    assert p.returncode == 130 and "devpeer serve: interrupted" in err, (p.returncode, err)


class FakeServiceConsole:
    """Answers the service VM commands a smoke sends, and records them."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers, self.commands = answers, []

    def run(self, command, timeout=30.0, abort=None):
        from edgevirt.console.expect import CommandResult

        self.commands.append(command)
        for key, out in self.answers.items():
            if key in command:
                return CommandResult(command, 0, out, 0.0)
        return CommandResult(command, 1, "", 0.0)


def test_gpio_and_i2c_far_side_in_the_service_vm(tmp_path):
    """The bank's side is gpio-sim's sysfs, the EEPROM's is i2c-stub's /dev/i2c-N."""
    gpio, i2c = device_smoke("gpio", tmp_path), device_smoke("i2c", tmp_path)
    con = FakeServiceConsole({
        "dev_name": "gpio-sim.0\ngpiochip1",
        "i2c-dev": "i2c-0 edgevirt i2c memory\ni2c-1 SMBus stub driver",
        "sim_gpio0/value": "1",
        "i2cget -y 1 0x50 0x10": "0xab",
        "pull-up": "",
    })  # fmt: skip
    gpio.attach_service(con)
    i2c.attach_service(con)
    assert gpio.sim == "/sys/devices/platform/gpio-sim.0/gpiochip1"
    assert gpio.driven(0) == 1
    gpio.pull(1, 1)
    assert con.commands[-1] == f"echo pull-up > {gpio.sim}/sim_gpio1/pull"
    assert i2c.stub_bus == "1" and i2c.backend_byte(0x10) == 0xAB
    from edgevirt.errors import DeployError

    with pytest.raises(DeployError, match="gpio-sim pull of line 0"):
        gpio.pull(0, 0)  # "pull-down" has no answer here: the command failed
    with pytest.raises(DeployError, match="no gpio-sim chip ev-gpio"):
        gpio.attach_service(FakeServiceConsole({}))


def test_net_service_side_addresses_the_tap_in_the_service_vm(tmp_path):
    net = device_smoke("net", tmp_path)
    con = FakeServiceConsole({"ip ": ""})
    net.attach_service(con)
    assert "ip addr add 10.0.2.1/24 dev ev0" in con.commands[0]
    assert net.service_arg() == "net:tap=ev0"
    net.close()  # no namespace was made on the host


class BlockingServiceConsole:
    """A service VM console whose command runs until the shell gets Ctrl-C (the first
    ``lost`` ones only arm the subshell's trap: they came before Python started)."""

    def __init__(self, lost: int = 0) -> None:
        self.interrupted = threading.Event()
        self.commands: list[str] = []
        self.lost, self.sent = lost, 0

    def run(self, command, timeout=30.0, abort=None):
        from edgevirt.console.expect import CommandResult

        self.commands.append(command)
        self.interrupted.wait(timeout)
        return CommandResult(command, 130, "", 0.0)

    def send(self, text):
        assert text == "\x03"
        self.sent += 1
        if self.sent > self.lost:
            self.interrupted.set()


def test_far_end_in_the_service_vm_runs_on_its_console_and_is_interrupted(tmp_path, monkeypatch):
    """A far end in the service VM is a devpeer command on its console; a check that gives
    up early interrupts it (Ctrl-C) so the console is free for the next device."""
    from edgevirt import devsmoke
    from edgevirt.devsmoke import Background
    from edgevirt.errors import DeployError

    smoke = device_smoke("vsock", tmp_path)
    con = BlockingServiceConsole()
    smoke.service = con
    far = FarEnd(smoke, "serve", "/run/edgevirt/vsock/vsock_5000", 1024, timeout=60)
    for _ in range(100):
        if con.commands:
            break
        threading.Event().wait(0.01)
    assert con.commands == ["( trap 'exit 130' INT; python3 -m edgevirt.devpeer --timeout 60 "
                            "serve /run/edgevirt/vsock/vsock_5000 1024 )"]  # fmt: skip
    far.close()
    assert con.interrupted.is_set() and far.bg is not None and far.bg.result is not None
    assert far.bg.result.status == 130
    # a Ctrl-C that came too early: close() interrupts again until the command ends
    monkeypatch.setattr(devsmoke, "INTERRUPT_WAIT", 0.05)
    smoke.service = con = BlockingServiceConsole(lost=2)
    far = FarEnd(smoke, "serve", "/run/edgevirt/vsock/vsock_5000", 1024, timeout=60)
    far.close()
    assert far.bg is not None and far.bg.result is not None and con.sent >= 3
    slow = Background(BlockingServiceConsole(), "sleep", 60)
    with pytest.raises(DeployError, match="still running"):
        slow.wait(0.05)
    slow.console.send("\x03")
