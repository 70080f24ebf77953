"""edgevirt's TFTP server against real clients (curl, tftp-hpa, atftp) and a raw UDP peer
for the cases no client produces on purpose (silence, strangers, write requests)."""

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgevirt.deploy.tftp import (
    ACK,
    DATA,
    ERROR,
    OACK,
    RRQ,
    WRQ,
    State,
    TftpError,
    TftpServer,
)

ROOT = Path(__file__).resolve().parent.parent
SIZES = [0, 1, 511, 512, 513, 100_003, 3 * 1024 * 1024 + 7]


def content(size: int, seed: int = 0) -> bytes:
    return (bytes((i * 7 + seed) & 0xFF for i in range(251)) * (size // 251 + 1))[:size]


@pytest.fixture
def root(tmp_path):
    d = tmp_path / "srv"
    d.mkdir()
    for n in SIZES:
        (d / f"f{n}.bin").write_bytes(content(n, n))
    (d / "sub").mkdir()
    (d / "sub" / "dtb").write_bytes(b"dtb!" * 100)
    (tmp_path / "secret").write_text("outside the root\n")
    (d / "escape").symlink_to(tmp_path / "secret")
    return d


@pytest.fixture
def server(root):
    events = []
    srv = TftpServer(root, port=0, progress=events.append, progress_interval=0)
    srv.events = events  # type: ignore[attr-defined]
    with srv:
        yield srv
    assert not [t for t in threading.enumerate() if t.name.startswith("tftp")]


def curl(srv: TftpServer, name: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    host, port = srv.address
    return subprocess.run(
        ["curl", "-sS", "--path-as-is", "--max-time", "30", *args, "-o", str(out)]
        + [f"tftp://{host}:{port}/{name}"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def done(srv: TftpServer, name: str, timeout: float = 5.0):
    """The finished transfer of ``name`` (the server notes it just after the last ACK)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for t in srv.finished:
            if t.filename == name:
                return t
        time.sleep(0.01)
    raise AssertionError(f"no finished transfer of {name}: {list(srv.finished)}")


# -- a raw peer ---------------------------------------------------------------------------


def request(op: int, name: str, mode: str = "octet", **opts: object) -> bytes:
    body = name.encode() + b"\0" + mode.encode() + b"\0"
    body += b"".join(f"{k}\0{v}\0".encode() for k, v in opts.items())
    return struct.pack("!H", op) + body


def peer() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(5)
    return s


def recv(s: socket.socket) -> tuple[int, int, bytes, tuple[str, int]]:
    pkt, src = s.recvfrom(70000)
    op, arg = struct.unpack_from("!HH", pkt)
    return op, arg, pkt[4:], src


def error_of(s: socket.socket) -> tuple[int, str]:
    op, code, rest, _ = recv(s)
    assert op == ERROR, (op, code, rest)
    return code, rest.rstrip(b"\0").decode()


def oack_options(payload: bytes) -> dict[str, str]:
    f = payload.split(b"\0")[:-1]
    return {f[i].decode(): f[i + 1].decode() for i in range(0, len(f), 2)}


def fetch_raw(s: socket.socket, srv: TftpServer, name: str, **opts: object) -> bytes:
    """A minimal lock-step client; returns the file, asserting block sizes on the way."""
    s.sendto(request(RRQ, name, **opts), srv.address)
    op, arg, payload, tid = recv(s)
    blksize = int(opts.get("blksize", 512))
    if opts:
        assert op == OACK
        blksize = int(oack_options(struct.pack("!H", arg) + payload).get("blksize", 512))
        s.sendto(struct.pack("!HH", ACK, 0), tid)
        op, arg, payload, _ = recv(s)
    data = bytearray()
    expect = 1
    while True:
        assert (op, arg) == (DATA, expect & 0xFFFF)
        assert len(payload) <= blksize
        data += payload
        s.sendto(struct.pack("!HH", ACK, arg), tid)
        if len(payload) < blksize:
            return bytes(data)
        expect += 1
        op, arg, payload, _ = recv(s)


# -- whole files --------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_curl_gets_whole_files_byte_identical(server, root, tmp_path, size):
    out = tmp_path / "out"
    r = curl(server, f"f{size}.bin", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == (root / f"f{size}.bin").read_bytes()
    t = done(server, f"f{size}.bin")
    assert t.state is State.DONE and t.sent == size and t.size == size
    # curl asks for tsize; we answer the real one (omitted for 0: curl refuses "tsize 0")
    assert t.options.get("tsize") == (str(size) if size else None)
    mine = [e for e in server.events if e.id == t.id]
    assert mine[-1].state is State.DONE


def test_progress_callback_sees_start_growth_and_end(root):
    seen: list[tuple[int, State]] = []
    cb = lambda t: seen.append((t.sent, t.state))  # noqa: E731
    with TftpServer(root, port=0, progress=cb, progress_interval=0) as srv:
        s = peer()
        assert fetch_raw(s, srv, "f100003.bin", blksize=1024) == content(100_003, 100_003)
        done(srv, "f100003.bin")
        s.close()
    assert seen[0] == (0, State.RUNNING) and seen[-1] == (100_003, State.DONE)
    sent = [n for n, _ in seen]
    assert sent == sorted(sent) and len(sent) > 3


@pytest.mark.parametrize("blksize", [8, 1468, 65464])
def test_curl_blksize_negotiated(server, root, tmp_path, blksize):
    out = tmp_path / "out"
    r = curl(server, "f100003.bin", out, "--tftp-blksize", str(blksize))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == (root / "f100003.bin").read_bytes()
    t = done(server, "f100003.bin")
    assert t.blksize == blksize and t.options["blksize"] == str(blksize)


def test_blksize_is_clamped_and_out_of_range_values_ignored(server, root):
    s = peer()
    s.sendto(request(RRQ, "f513.bin", blksize=100000, tsize=0), server.address)
    op, arg, payload, tid = recv(s)
    assert op == OACK
    opts = oack_options(struct.pack("!H", arg) + payload)
    assert opts == {"blksize": "65464", "tsize": "513"}
    s.sendto(struct.pack("!HH", ACK, 0), tid)
    op, block, data, _ = recv(s)
    assert (op, block, data) == (DATA, 1, content(513, 513))  # one block holds it all
    s.sendto(struct.pack("!HH", ACK, 1), tid)
    # Below the RFC 2348 minimum, and not a number: ignored, so no OACK at all.
    s2 = peer()
    s2.sendto(request(RRQ, "f513.bin", blksize=4, foo="bar"), server.address)
    op, block, data, tid2 = recv(s2)
    assert (op, block, len(data)) == (DATA, 1, 512)
    s2.sendto(struct.pack("!HH", ACK, 1), tid2)
    assert recv(s2)[:3] == (DATA, 2, content(513, 513)[512:])
    s2.sendto(struct.pack("!HH", ACK, 2), tid2)
    s.close()
    s2.close()


def test_tsize_and_timeout_options(server):
    s = peer()
    s.sendto(request(RRQ, "f100003.bin", tsize=0, timeout=3), server.address)
    op, arg, payload, tid = recv(s)
    assert op == OACK
    assert oack_options(struct.pack("!H", arg) + payload) == {"tsize": "100003", "timeout": "3"}
    s.sendto(struct.pack("!HH", ERROR, 8) + b"changed my mind\0", tid)  # RFC 2347 refusal
    t = done(server, "f100003.bin")
    assert t.state is State.FAILED and "changed my mind" in (t.error or "")
    s.close()


def test_curl_without_options_is_plain_rfc1350(server, root, tmp_path):
    out = tmp_path / "out"
    r = curl(server, "f100003.bin", out, "--tftp-no-options")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == (root / "f100003.bin").read_bytes()
    assert done(server, "f100003.bin").options == {}


@pytest.mark.skipif(not shutil.which("tftp"), reason="tftp-hpa client not installed")
@pytest.mark.parametrize("size", [0, 512, 3 * 1024 * 1024 + 7])
def test_tftp_hpa_client(server, root, tmp_path, size):
    host, port = server.address
    out = tmp_path / "out"
    subprocess.run(
        ["tftp", host, str(port), "-m", "binary", "-c", "get", f"f{size}.bin", str(out)],
        check=True,
        timeout=60,
    )
    assert out.read_bytes() == (root / f"f{size}.bin").read_bytes()


@pytest.mark.skipif(not shutil.which("tftp"), reason="tftp-hpa client not installed")
def test_netascii_round_trips_through_tftp_hpa(server, root, tmp_path):
    text = b"line one\nline two\r\nbare\rcr\n"
    (root / "notes.txt").write_bytes(text)
    host, port = server.address
    out = tmp_path / "out"
    subprocess.run(
        ["tftp", host, str(port), "-m", "ascii", "-c", "get", "notes.txt", str(out)],
        check=True,
        timeout=30,
    )
    assert out.read_bytes() == text
    s = peer()  # on the wire: LF -> CR LF, CR -> CR NUL
    s.sendto(request(RRQ, "notes.txt", "netascii"), server.address)
    op, block, data, tid = recv(s)
    assert data == b"line one\r\nline two\r\0\r\nbare\r\0cr\r\n"
    s.sendto(struct.pack("!HH", ACK, block), tid)
    s.close()


@pytest.mark.skipif(not shutil.which("atftp"), reason="atftp not installed")
def test_atftp_with_windowsize_and_large_blocks(server, root, tmp_path):
    host, port = server.address
    out = tmp_path / "out"
    name = f"f{3 * 1024 * 1024 + 7}.bin"
    opts = ["--option", "blksize 8192", "--option", "tsize 0", "--option", "windowsize 8"]
    subprocess.run(
        ["atftp", "-g", "-r", name, "-l", str(out), *opts, host, str(port)],
        check=True,
        timeout=60,
        capture_output=True,
    )
    assert out.read_bytes() == (root / name).read_bytes()
    t = done(server, name)
    assert (t.blksize, t.windowsize, t.state) == (8192, 8, State.DONE)


def test_block_numbers_wrap_past_65535(server, root, tmp_path):
    (root / "wrap.bin").write_bytes(content(8 * 70000 + 3, 9))  # 70001 blocks of 8 bytes
    s = peer()
    assert fetch_raw(s, server, "wrap.bin", blksize=8) == content(8 * 70000 + 3, 9)
    assert done(server, "wrap.bin").state is State.DONE
    s.close()


# -- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../secret", "/../secret", "sub/../../secret", "sub/../sub/dtb", "escape"]
)
def test_path_traversal_refused_with_access_violation(server, name):
    s = peer()
    s.sendto(request(RRQ, name), server.address)
    code, msg = error_of(s)
    assert code == 2 and ("traversal" in msg or "outside" in msg)
    s.close()


def test_traversal_through_curl_is_a_permission_error(server, tmp_path):
    r = curl(server, "../secret", tmp_path / "out")
    assert r.returncode == 69  # CURLE_TFTP_PERM: the server sent error 2
    assert not (tmp_path / "out").exists() or (tmp_path / "out").read_bytes() == b""


def test_missing_file_and_directory(server, tmp_path):
    s = peer()
    s.sendto(request(RRQ, "nope.bin"), server.address)
    assert error_of(s) == (1, "'nope.bin': file not found")
    s.sendto(request(RRQ, "/etc/passwd"), server.address)  # absolute: still under the root
    assert error_of(s)[0] == 1
    s.sendto(request(RRQ, "sub"), server.address)
    assert error_of(s) == (2, "'sub': not a regular file")
    assert curl(server, "nope.bin", tmp_path / "o").returncode == 68  # CURLE_TFTP_NOTFOUND
    assert curl(server, "sub/dtb", tmp_path / "o").returncode == 0  # subdirectories are fine
    s.close()


def test_write_requests_refused(server, root, tmp_path):
    s = peer()
    s.sendto(request(WRQ, "new.bin"), server.address)
    code, msg = error_of(s)
    assert code == 2 and "read-only" in msg
    up = tmp_path / "up.bin"
    up.write_bytes(b"x" * 2000)
    host, port = server.address
    r = subprocess.run(
        ["curl", "-sS", "-T", str(up), f"tftp://{host}:{port}/up.bin"],
        capture_output=True,
        timeout=30,
    )
    assert r.returncode != 0
    assert not (root / "new.bin").exists() and not (root / "up.bin").exists()
    s.close()


@pytest.mark.parametrize(
    "packet,code",
    [(b"\x00", 4), (b"\x00\x03\x00\x01data", 4), (request(RRQ, "f1.bin", "mail"), 4)],
)
def test_malformed_requests_get_illegal_operation(server, packet, code):
    s = peer()
    s.sendto(packet, server.address)
    assert error_of(s)[0] == code
    s.sendto(request(RRQ, "f1.bin"), server.address)  # and the server still serves
    assert recv(s)[:3] == (DATA, 1, content(1, 1))
    s.close()


# -- timeouts, strangers, concurrency, shutdown -------------------------------------------


def test_silent_client_times_out_while_others_are_served(root, tmp_path):
    with TftpServer(root, port=0, retries=2) as srv:
        stalled = peer()
        stalled.sendto(request(RRQ, "f100003.bin", timeout=1), srv.address)
        op, _, _, _ = recv(stalled)
        assert op == OACK  # ... and never acknowledged
        t0 = time.monotonic()
        out = tmp_path / "out"
        r = curl(srv, f"f{3 * 1024 * 1024 + 7}.bin", out)
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == (root / f"f{3 * 1024 * 1024 + 7}.bin").read_bytes()
        resent = 0
        while True:
            op, code, rest, _ = recv(stalled)
            if op == ERROR:
                break
            resent += 1
        assert op == ERROR and "timed out" in rest.decode()
        assert resent == 2  # the OACK went 3 times (retries=2), then the error
        t = done(srv, "f100003.bin")
        assert t.state is State.FAILED and "timed out" in (t.error or "")
        assert 2.5 < time.monotonic() - t0 < 6
        stalled.close()


def test_lost_ack_is_retransmitted_and_duplicate_ack_ignored(server):
    s = peer()
    s.sendto(request(RRQ, "f100003.bin", timeout=1, blksize=1024), server.address)
    _, _, _, tid = recv(s)
    s.sendto(struct.pack("!HH", ACK, 0), tid)
    assert recv(s)[:2] == (DATA, 1)
    # We "lose" DATA 1's ACK: the server must send block 1 again after its timeout.
    t0 = time.monotonic()
    assert recv(s)[:2] == (DATA, 1)
    assert 0.8 < time.monotonic() - t0 < 2.0
    s.sendto(struct.pack("!HH", ACK, 1), tid)
    assert recv(s)[:2] == (DATA, 2)
    s.sendto(struct.pack("!HH", ACK, 1), tid)  # a duplicate: no resend of block 2 for it
    s.settimeout(0.5)
    with pytest.raises(TimeoutError):
        recv(s)
    s.close()
    assert [t for t in server.active.values() if t.filename == "f100003.bin"][0].retransmits == 1


def test_stranger_gets_unknown_tid_and_transfer_goes_on(server):
    s, stranger = peer(), peer()
    s.sendto(request(RRQ, "f100003.bin"), server.address)
    op, block, data, tid = recv(s)
    assert (op, block) == (DATA, 1)
    stranger.sendto(struct.pack("!HH", ACK, 1), tid)
    assert error_of(stranger)[0] == 5
    got = bytearray(data)
    while len(data) == 512:
        s.sendto(struct.pack("!HH", ACK, block), tid)
        op, block, data, _ = recv(s)
        got += data
    s.sendto(struct.pack("!HH", ACK, block), tid)
    assert bytes(got) == content(100_003, 100_003)
    s.close()
    stranger.close()


def test_transfers_beyond_the_limit_are_told_busy(root, tmp_path):
    with TftpServer(root, port=0, max_transfers=1, retries=1) as srv:
        stalled = peer()
        stalled.sendto(request(RRQ, "f513.bin", timeout=1), srv.address)
        assert recv(stalled)[0] == OACK
        other = peer()
        other.sendto(request(RRQ, "f1.bin"), srv.address)
        code, msg = error_of(other)
        assert code == 0 and "busy" in msg
        done(srv, "f513.bin", timeout=5)  # the stalled one times out and frees its slot
        assert curl(srv, "f1.bin", tmp_path / "o").returncode == 0
        stalled.close()
        other.close()


def test_close_stops_running_transfers_promptly_and_frees_the_port(root):
    srv = TftpServer(root, port=0).start()
    s = peer()
    s.sendto(request(RRQ, "f100003.bin", timeout=255), srv.address)
    assert recv(s)[0] == OACK
    t0 = time.monotonic()
    srv.close()
    assert time.monotonic() - t0 < 1.5
    code, msg = error_of(s)
    assert (code, msg) == (0, "server shutting down")
    assert not [t for t in threading.enumerate() if t.name.startswith("tftp")]
    TftpServer(root, port=srv.address[1]).close()  # the port is free again
    s.close()


def test_bad_root_and_busy_port_are_clear_errors(root, tmp_path):
    with pytest.raises(TftpError, match="not a directory"):
        TftpServer(tmp_path / "nothing", port=0)
    with TftpServer(root, port=0) as srv, pytest.raises(TftpError, match="cannot bind"):
        TftpServer(root, port=srv.address[1])


# -- the command --------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_serves_and_stops_cleanly(root, tmp_path, sig):
    p = subprocess.Popen(
        [sys.executable, "-m", "edgevirt", "tftp", "serve", str(root), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
        # A background job inherits SIGINT ignored: give the server Python's default back.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler),
    )
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        m = re.search(r"tftp://127\.0\.0\.1:(\d+)/", line)
        assert m, line
        url = f"tftp://127.0.0.1:{m.group(1)}"
        out = tmp_path / "out"
        r = subprocess.run(["curl", "-sS", "-o", str(out), f"{url}/f100003.bin"], timeout=30)
        assert r.returncode == 0 and out.read_bytes() == (root / "f100003.bin").read_bytes()
        r = subprocess.run(["curl", "-sS", "--path-as-is", f"{url}/../secret"], timeout=30)
        assert r.returncode == 69
        p.send_signal(sig)
        _, stderr = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, stderr
    assert "f100003.bin" in stderr and "100003 bytes" in stderr
