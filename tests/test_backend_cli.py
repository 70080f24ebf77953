"""`edgevirt backend run --json` and `edgevirt backend status` as a user runs them."""

import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgevirt.backend.config import load_backend_spec
from edgevirt.backend.devices import blk as b
from edgevirt.backend.transport.vhost_user.frontend import VhostUserFrontend
from edgevirt.backend.transport.virtio_msg import ivshmem
from edgevirt.backend.transport.virtio_msg import protocol as p
from edgevirt.backend.transport.virtio_msg.driver import MsgDriver
from edgevirt.backend.transport.virtio_msg.protocol import MsgId
from edgevirt.backend.transport.virtio_msg.service import map_carveout
from edgevirt.backend.virtq.driver import DriverQueue
from edgevirt.cli import cli
from edgevirt.errors import ConfigError


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


# -- virtio-msg transport, spec files, live view ---------------------------------------------

BASE = 0x5C00_0000
CARVEOUT = 2 << 20


def start(args: list[str], **kw: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edgevirt", "backend", "run", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw,  # type: ignore[call-overload]
    )  # fmt: skip


def stop(proc: subprocess.Popen) -> tuple[str, str]:
    try:
        os.kill(proc.pid, signal.SIGTERM)
        return proc.communicate(timeout=30)  # a drain, then the final stats; generous under load
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def msg_files(tmp_path: Path) -> tuple[Path, Path]:
    carve = tmp_path / "carveout"
    with open(carve, "wb") as f:
        f.truncate(CARVEOUT)
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    return carve, disk


def msg_blk_write(sock: str, carve: Path, data: bytes) -> None:
    """A driver peer (what QEMU + the guest module do): negotiate blk, write ``data`` at
    sector 0 through a real virtqueue in the carve-out."""
    mem = map_carveout(carve, BASE)
    try:
        with MsgDriver(sock, mem) as drv:
            assert drv.negotiate(0, drv.features(0) & ~(1 << 29)) & p.STATUS_FEATURES_OK
            q = DriverQueue(mem, 8, base=BASE)
            drv.setup_queue(0, 0, q)
            assert drv.driver_ok(0) & p.STATUS_DRIVER_OK
            q.add([b.REQ_HEADER.pack(b.T_OUT, 0, 0), data], [1])
            drv.kick(0, 0)
            drv.wait_used(0, 0)
            [(_head, written)] = q.get_used()
            assert written == 1
    finally:
        mem.close()


def test_msg_transport_from_spec_serves_blk_then_sigterm_final_stats(tmp_path):
    carve, disk = msg_files(tmp_path)
    spec = tmp_path / "backend.toml"
    # Relative paths are relative to the spec; the carve-out file comes from the command
    # line (a launcher names its /dev/shm file per run) and overrides nothing else.
    spec.write_text(
        'transport = "msg"\nstats = "stats.json"\n'
        '[msg]\nsocket = "s/ivshmem.sock"\ncarveout_base = 0x5c000000\n'
        '[[device]]\ntype = "blk"\npath = "disk.img"\n[[device]]\ntype = "rng"\n'
    )
    proc = start(["--spec", str(spec), "--carveout-file", str(carve), "--json"])
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["transport"] == "msg" and ready["devices"] == ["blk", "rng"]
        assert ready["bus"] == str(tmp_path / "s" / "ivshmem.sock")
        assert ready["carveout"] == {"file": str(carve), "base": hex(BASE), "size": CARVEOUT}
        msg_blk_write(ready["bus"], carve, b"m" * 512)
    finally:
        rest, errout = stop(proc)
    assert proc.returncode == 0, errout
    final = json.loads(rest)
    assert final["transport"] == "virtio-msg" and final["running"] is False
    assert final["messages_in"] >= 8 and final["protocol_errors"] == 0
    assert final["doorbells_in"] > 0  # the driver rang; not only the back-stop poll
    blk, rng = final["devices"]
    assert (blk["device"], blk["dev_num"], rng["device"], rng["dev_num"]) == ("blk", 0, "rng", 1)
    assert blk["requests"] == 1 and blk["bytes_read"] == 512 and blk["refused"] == 0
    assert blk["mapped_bytes"] == CARVEOUT  # the carve-out and nothing else
    assert disk.read_bytes()[:512] == b"m" * 512
    stats = tmp_path / "stats.json"
    assert json.loads(stats.read_text())["devices"][0]["requests"] == 1
    r = CliRunner().invoke(cli, ["backend", "status", str(stats)])
    assert r.exit_code == 0 and r.output.count("virtio-msg bus") == 2  # devices' title + bus


def test_msg_polling_fallback_serves_a_driver_without_doorbell(tmp_path):
    carve, disk = msg_files(tmp_path)
    sock = str(tmp_path / "iv.sock")
    common = ["--transport", "msg", "--device", f"blk:path={disk}", "--ivshmem-socket", sock,
              "--carveout-file", str(carve), "--carveout-base", hex(BASE), "--json"]  # fmt: skip
    # A 5 s poll: a doorbell-less request is not answered for a second; a rung one at once.
    proc = start([*common, "--poll-interval", "5"])
    try:
        assert json.loads(proc.stdout.readline())["poll_interval"] == 5.0
        with MsgDriver(sock, doorbell=False) as drv:
            with pytest.raises(TimeoutError):
                drv.request(MsgId.GET_DEVICE_STATUS, 0, timeout=1.0)
            ivshmem.ring(drv.peer.eventfds[drv.device_peer][0])
            drv.wait_for(lambda m: m.response and m.msg_id == MsgId.GET_DEVICE_STATUS, 2.0)
    finally:
        stop(proc)
    assert proc.returncode == 0
    # A 10 ms poll serves a whole blk write without a single doorbell.
    proc = start([*common, "--poll-interval", "0.01"])
    try:
        proc.stdout.readline()
        mem = map_carveout(carve, BASE)
        try:
            with MsgDriver(sock, mem, doorbell=False) as drv:
                assert drv.negotiate(0, drv.features(0) & ~(1 << 29)) & p.STATUS_FEATURES_OK
                q = DriverQueue(mem, 8, base=BASE)
                drv.setup_queue(0, 0, q)
                drv.driver_ok(0)
                q.add([b.REQ_HEADER.pack(b.T_OUT, 0, 1), b"p" * 512], [1])
                drv.kick(0, 0)
                drv.wait_used(0, 0)
        finally:
            mem.close()
    finally:
        rest, _ = stop(proc)
    final = json.loads(rest)
    assert final["doorbells_in"] == 0 and final["devices"][0]["requests"] == 1
    assert disk.read_bytes()[512:1024] == b"p" * 512


def test_vhost_user_from_spec_file(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    spec = tmp_path / "b.toml"
    spec.write_text(
        '[vhost_user]\nsocket_dir = "socks"\n'
        '[[device]]\ntype = "blk"\npath = "disk.img"\nqueues = 2\nreadonly = true\n'
    )
    proc = start(["--spec", str(spec), "--json"])
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready == {"event": "ready", "transport": "vhost-user",
                         "sockets": {"blk": str(tmp_path / "socks" / "0-blk.sock")}}  # fmt: skip
        fe = VhostUserFrontend(ready["sockets"]["blk"])
        offered = fe.negotiate()
        config = fe.get_config(60)
        fe.close()
    finally:
        rest, errout = stop(proc)
    assert proc.returncode == 0, errout
    assert int.from_bytes(config[34:36], "little") == 2  # num_queues from the spec
    assert offered & (1 << 5)  # VIRTIO_BLK_F_RO: readonly = true from the spec
    assert json.loads(rest)["devices"][0]["device"] == "blk"


RNG = '[[device]]\ntype = "rng"\n'
BLK = '[[device]]\ntype = "blk"\npath = "d.img"\n'
MSG = 'transport = "msg"\n[msg]\n'
SPEC_ERRORS = [
    ('transport = "pci"\n' + RNG, "b.toml.transport: expected one of"),
    (RNG + "queues = 2\n", r"b.toml: \[\[device\]\]\[0\] \(rng\): unknown key"),
    (BLK.replace("d.img", "nope.img"), r"\[\[device\]\]\[0\].path: .*nope.img does not exist"),
    (BLK + "queues = 0\n", r"\[\[device\]\]\[0\].queues: expected 1..64"),
    (BLK + 'readonly = "yes"\n', r"\[0\].readonly: expected bool"),
    (BLK + 'cache = "fast"\n', r"\[0\].cache: expected one of writeback, none, got 'fast'"),
    (BLK + 'aio = "native"\n', r"\[0\].aio: expected one of auto, io_uring, threads, sync"),
    ('[[device]]\ntype = "floppy"\n', r"\[\[device\]\]\[0\].type: expected one of blk, rng"),
    ("", r"b.toml: expected at least one \[\[device\]\]"),
    ('[msg]\nsocket = "x"\n' + RNG, r"\[msg\]: applies to transport 'msg' only"),
    (MSG + 'carveout_base = "low"\n' + RNG, r"\[msg\].carveout_base: expected an address"),
    (MSG + "poll_interval = 0\n" + RNG, r"\[msg\].poll_interval: expected seconds"),
    (MSG + 'sokcet = "x"\n' + RNG, r"\[msg\]: unknown key\(s\) sokcet"),
    ("transport = \n", "b.toml: "),
]


def test_spec_cache_and_aio_reach_the_device(tmp_path):
    (tmp_path / "d.img").write_bytes(bytes(8192))
    spec = tmp_path / "b.toml"
    spec.write_text(BLK + 'cache = "none"\naio = "threads"\n')
    dev = load_backend_spec(spec).devices[0].open()
    try:
        assert (dev.cache, dev.aio, dev.direct, dev.fd_direct >= 0) == ("none", "threads", True,
                                                                       True)  # fmt: skip
    finally:
        dev.close()


@pytest.mark.parametrize(("text", "message"), SPEC_ERRORS)
def test_spec_errors_name_file_and_key(tmp_path, text, message):
    (tmp_path / "d.img").write_bytes(bytes(4096))
    spec = tmp_path / "b.toml"
    spec.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_backend_spec(spec)


def test_spec_errors_and_usage_errors_exit_codes(tmp_path):
    spec = tmp_path / "b.toml"
    spec.write_text('[[device]]\ntype = "blk"\npath = "gone.img"\n')

    def run(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "edgevirt", "backend", "run", *args]
        wide = {**os.environ, "COLUMNS": "400"}  # one line per message
        return subprocess.run(cmd, capture_output=True, text=True, env=wide)

    r = run("--spec", str(spec), "--socket-dir", str(tmp_path))
    assert r.returncode == 4 and f"{spec}: [[device]][0].path" in r.stderr
    r = run("--spec", str(tmp_path / "none.toml"))
    assert r.returncode == 4 and "none.toml not found" in r.stderr
    runner = CliRunner()
    msg = ["--device", "rng", "--transport", "msg"]
    usage = [
        (["--device", "rng"], "--socket-dir"),
        ([*msg, "--ivshmem-socket", "s"], "--carveout-file"),
        (["--device", "rng", "--socket-dir", "d", "--poll-interval", "1"], "only for --transport"),
        ([*msg, "--socket-dir", "d"], "only for --transport vhost-user"),
        (["--spec", str(spec), "--device", "rng"], "not both"),
        ([], "nothing to serve"),
        ([*msg, "--ivshmem-socket", "s", "--carveout-file", "c", "--carveout-base", "low"],
         "expected an address"),
    ]  # fmt: skip
    for args, message in usage:
        r = runner.invoke(cli, ["backend", "run", *args])
        assert r.exit_code == 2, (args, r.output)
        assert message in r.output, (args, r.output)
    # A carve-out file that does not exist is the back-end's error (1), devices closed.
    gone = ["--carveout-file", str(tmp_path / "no"), "--carveout-base", "0x0"]
    r = runner.invoke(cli, ["backend", "run", *msg, "--ivshmem-socket", str(tmp_path / "s"), *gone])
    assert r.exit_code == 1 and "carve-out file" in r.output


def test_live_view_on_a_terminal_then_final_tables(tmp_path):
    """On a TTY the counters are redrawn while serving; --json or a pipe gets none of it."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgevirt", "backend", "run", "--device", f"blk:path={disk}",
         "--socket-dir", str(tmp_path / "s")],
        stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE,
        env={**os.environ, "TERM": "xterm", "COLUMNS": "160"},
    )  # fmt: skip
    os.close(slave)
    screen = b""

    def read_until(pattern: bytes, timeout: float = 15.0) -> None:
        nonlocal screen
        deadline = time.monotonic() + timeout
        while pattern not in screen:
            assert time.monotonic() < deadline, screen[-2000:]
            if select.select([master], [], [], 0.2)[0]:
                try:
                    screen += os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break

    try:
        read_until(b"serving for")
        assert b"queues" in screen and b"vhost-user" in screen
        fe = VhostUserFrontend(str(tmp_path / "s" / "0-blk.sock"))
        fe.negotiate()
        fe.set_mem_table()
        fe.setup_vring(0)
        for i in range(3):
            fe.vrings[0].driver.add([b.REQ_HEADER.pack(b.T_OUT, i, 0), b"l" * 512], [1])
            fe.kick(0)
            assert fe.wait_call(0)
        # The view is redrawn from the live counters: 3 requests, 1536 bytes in.
        screen = b""
        read_until(b"1536")
        fe.close()
        os.kill(proc.pid, signal.SIGTERM)
        # Keep reading while it exits: a terminal nobody reads fills up, and the final
        # tables would block the child's write (and its exit) forever.
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    screen += os.read(master, 65536)
                except OSError:
                    break
        assert proc.wait(1) == 0
        read_until(b"(stopped, ring")  # the final tables replace the live view
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        proc.stderr.close()
    assert b"\x1b[" in screen  # drawn with terminal control sequences
