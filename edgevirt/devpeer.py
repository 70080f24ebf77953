"""The far-end programs of the device smoke checks (:mod:`edgevirt.devsmoke`).

``python3 -m edgevirt.devpeer PROGRAM ARGS…`` runs on whichever side serves the device: on
the host (inside the run's network namespace for net) or in the service VM, whose rootfs
carries this module (standard library only: the service VM has Python but not
edgevirt's host dependencies). Each program prints one result line the smoke parses::

    recv HOST PORT SIZE       TCP: listen, print "listening", take SIZE bytes,
                              print "got N SHA256"
    send HOST PORT SIZE       TCP: connect (retrying until the guest listens), send SIZE
                              random bytes, print "sent N SHA256"
    serve PATH SIZE           unix socket (a vsock port's host side): listen on PATH, print
                              "listening", take one connection, read to EOF ("got N SHA256"),
                              answer SIZE random bytes on it ("sent N SHA256")
    talk PATH TEXT SIZE       unix socket (a console port's host side): connect, send TEXT,
                              then read SIZE bytes: "got N SHA256"
    connect PATH PORT SIZE    a stream the host side opens to a guest's vsock listener
                              (hybrid mode): connect to PATH (``<dir>/vsock``), write
                              "CONNECT PORT", wait for "OK <host port>" (retrying until the
                              guest listens: a refused CONNECT is closed), print
                              "connected HOSTPORT", read to EOF ("got N SHA256"), answer
                              SIZE random bytes ("sent N SHA256")

Every program ends by itself within its ``--timeout`` (default 300 s) and then exits 1.
Ctrl-C (a check that gave up early) ends it with exit 130 *as a normal exit*: a program
killed by SIGINT makes the service VM's interactive shell abandon the rest of the command
line, and with it the end marker the console waits for.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import sys
import time
from collections.abc import Sequence

CHUNK = 1 << 16


def _drain(c: socket.socket, size: int | None) -> tuple[int, str]:
    """Read until ``size`` bytes (None: EOF); returns the count and the sha256."""
    h, n = hashlib.sha256(), 0
    while size is None or n < size:
        b = c.recv(CHUNK if size is None else min(CHUNK, size - n))
        if not b:
            break
        h.update(b)
        n += len(b)
    return n, h.hexdigest()


def _listen(sock: socket.socket) -> None:
    sock.listen(1)
    print("listening", flush=True)


def recv(host: str, port: int, size: int, timeout: float) -> str:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.settimeout(timeout)
        s.bind((host, port))
        _listen(s)
        c, _ = s.accept()
        with c:
            c.settimeout(timeout)
            n, sha = _drain(c, size)
    return f"got {n} {sha}"


def send(host: str, port: int, size: int, timeout: float) -> str:
    data = os.urandom(size)
    deadline = time.monotonic() + timeout
    while True:
        try:
            c = socket.create_connection((host, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    with c:
        c.settimeout(timeout)
        c.sendall(data)
    return f"sent {size} {hashlib.sha256(data).hexdigest()}"


def serve(path: str, size: int, timeout: float) -> str:
    if os.path.exists(path):
        os.unlink(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.bind(path)
        _listen(s)
        c, _ = s.accept()
        return _answer(c, size, timeout)


def _answer(c: socket.socket, size: int, timeout: float) -> str:
    """Take the peer's data to EOF ("got N SHA256"), then answer ``size`` random bytes."""
    with c:
        c.settimeout(timeout)
        n, sha = _drain(c, None)
        print(f"got {n} {sha}", flush=True)
        data = os.urandom(size)
        c.sendall(data)
    return f"sent {size} {hashlib.sha256(data).hexdigest()}"


def _line(c: socket.socket) -> bytes:
    """One handshake line, byte by byte: the stream's data follows it on the socket."""
    line = b""
    while not line.endswith(b"\n") and len(line) < 64:
        b = c.recv(1)
        if not b:
            break
        line += b
    return line


def connect(path: str, port: int, size: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(max(1.0, deadline - time.monotonic()))
        try:
            c.connect(path)
            c.sendall(f"CONNECT {port}\n".encode())
            line = _line(c)
        except OSError:
            line = b""
        if line.startswith(b"OK ") and line.endswith(b"\n"):
            break
        c.close()
        if line.startswith(b"ERR"):
            raise OSError(f"{path} refused the handshake: {line.decode(errors='replace')!r}")
        if time.monotonic() > deadline:
            raise OSError(f"no guest accepted port {port} through {path} in {timeout:.0f}s")
        time.sleep(0.2)
    print(f"connected {line.split()[1].decode(errors='replace')}", flush=True)
    return _answer(c, size, timeout)


def talk(path: str, text: str, size: int, timeout: float) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(timeout)
        c.connect(path)
        c.sendall(text.encode())
        n, sha = _drain(c, size)
    return f"got {n} {sha}"


def parse(output: str, word: str) -> tuple[int, str] | None:
    """``(N, sha256)`` of the result line ``WORD N SHA256`` in a program's output."""
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == word and parts[1].isdigit() and len(parts[2]) == 64:
            return int(parts[1]), parts[2]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m edgevirt.devpeer")
    ap.add_argument("--timeout", type=float, default=300.0)
    sub = ap.add_subparsers(dest="program", required=True)
    for name in ("recv", "send"):
        p = sub.add_parser(name)
        p.add_argument("host")
        p.add_argument("port", type=int)
        p.add_argument("size", type=int)
    p = sub.add_parser("serve")
    p.add_argument("path")
    p.add_argument("size", type=int)
    p = sub.add_parser("talk")
    p.add_argument("path")
    p.add_argument("text")
    p.add_argument("size", type=int)
    p = sub.add_parser("connect")
    p.add_argument("path")
    p.add_argument("port", type=int)
    p.add_argument("size", type=int)
    a = ap.parse_args(argv)
    try:
        if a.program == "recv":
            out = recv(a.host, a.port, a.size, a.timeout)
        elif a.program == "send":
            out = send(a.host, a.port, a.size, a.timeout)
        elif a.program == "serve":
            out = serve(a.path, a.size, a.timeout)
        elif a.program == "connect":
            out = connect(a.path, a.port, a.size, a.timeout)
        else:
            out = talk(a.path, a.text, a.size, a.timeout)
    except OSError as e:
        print(f"devpeer {a.program}: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"devpeer {a.program}: interrupted", file=sys.stderr, flush=True)
        return 130
    print(out, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
