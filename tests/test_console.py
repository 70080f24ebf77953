"""Expect engine and marker-framed commands against a real shell on a pty."""

import re
import time

import pytest

from edgevirt.console.expect import Console
from edgevirt.console.fake import PtyShellPort
from edgevirt.errors import ConsoleError, ConsoleTimeout


@pytest.fixture
def con(tmp_path):
    c = Console(PtyShellPort(), log_path=tmp_path / "console.log", name="fake")
    c.expect(rb"fake# ", 5)
    yield c
    c.close()


def test_run_returns_output_and_status_despite_echo(con):
    res = con.run("echo hello; echo world")
    assert res.status == 0
    assert res.output == "hello\nworld"


def test_run_nonzero_status(con):
    assert con.run("sh -c 'exit 7'").status == 7


def test_run_empty_output(con):
    res = con.run("true")
    assert (res.status, res.output) == (0, "")


def test_output_without_trailing_newline(con):
    assert con.run("printf abc").output == "abc"


def test_output_that_quotes_the_markers_literally(con):
    # The command line itself contains the marker text split by quotes: not a false frame.
    res = con.run("echo EV''B99; echo EV''E99 5")
    assert res.status == 0 and res.output == "EVB99\nEVE99 5"


def test_large_output_one_mebibyte(con):
    res = con.run("head -c 1048576 /dev/zero | od -An -v -tx1 | head -c 1048576; echo", timeout=60)
    assert res.status == 0
    assert len(res.output.replace("\n", "")) >= 1048576 - 1048576 // 49


def test_interleaved_background_messages_before_frame(con):
    # A message printed while the command line is being sent (like a kernel printk)
    # lands before the begin marker and must not leak into the output.
    con.sendline("(sleep 0.05; echo '[   12.5] virtio_blk virtio0: noise') &")
    time.sleep(0.2)
    res = con.run("echo payload")
    assert res.output == "payload"


def test_timeout_quotes_last_lines(con):
    con.sendline("echo last-words-before-silence")
    with pytest.raises(ConsoleTimeout) as ei:
        con.expect(rb"never-appears", 0.5)
    assert "last-words-before-silence" in str(ei.value)
    assert "never-appears" in str(ei.value)


def test_kernel_panic_detected_while_waiting(con):
    con.sendline("echo 'Kernel panic - not syncing: VFS: Unable to mount root fs'")
    with pytest.raises(ConsoleError, match="target failed: Kernel panic - not syncing: VFS"):
        con.expect(rb"never", 5)


def test_oops_detected_during_run(con):
    with pytest.raises(ConsoleError, match="Internal error: Oops"):
        con.run("echo 'Internal error: Oops: 96000004 [#1] SMP'; sleep 5", timeout=10)


def test_disconnect_is_reported(con):
    con.port.kill()
    with pytest.raises(ConsoleError, match="disconnected"):
        con.run("echo x", timeout=5)


def test_abort_callback_interrupts_wait(con):
    calls = []

    def abort():
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("backend broke")

    with pytest.raises(RuntimeError, match="backend broke"):
        con.expect(rb"never", 30, abort)


def test_log_is_timestamped(con, tmp_path):
    con.run("echo logged-line")
    con.close()
    text = (tmp_path / "console.log").read_text()
    assert re.search(r"^\[\s*\d+\.\d{3}\] logged-line$", text, re.M)
    assert "## run #1: echo logged-line" in text


def test_unix_url_handler(tmp_path):
    import socket
    import threading

    path = tmp_path / "c.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)

    def serve():
        conn, _ = srv.accept()
        conn.sendall(b"U-Boot 2023.01\r\n=> ")
        conn.recv(100)
        conn.close()

    t = threading.Thread(target=serve)
    t.start()
    c = Console.open(f"unix://{path}")
    assert c.expect(rb"=> ", 5)
    c.sendline("version")
    t.join()
    with pytest.raises(ConsoleError, match="disconnected"):
        c.expect(rb"never", 5)
    c.close()
    srv.close()


def test_open_unreachable_url_fails_clearly(tmp_path):
    with pytest.raises(ConsoleError, match="cannot open unix://.*within 0s"):
        Console.open(f"unix://{tmp_path}/absent.sock", connect_timeout=0.2)
