"""A small read-only TFTP server: how a board's U-Boot fetches images from the host.

RFC 1350 read requests (``octet`` and ``netascii``), with the option extension (RFC 2347)
and the ``blksize`` (RFC 2348), ``tsize`` and ``timeout`` (RFC 2349) and ``windowsize``
(RFC 7440) options. Write requests are refused. Every file comes from one root directory:
a name with a ``..`` component, or one that resolves (through symlinks) outside the root,
is answered with an "access violation" error packet.

Each transfer runs in its own thread on its own UDP socket (its TID, RFC 1350 section 4),
retransmits its window when no ACK arrives within the timeout and gives up after
``retries`` silent timeouts. At most ``max_transfers`` run at once; a request beyond that
is answered "server busy". ``progress`` is called (from the transfer's thread) when a
transfer starts, as acknowledged bytes grow (at most every ``progress_interval`` s) and
when it ends, so a UI can draw one bar per transfer.

    with TftpServer(root, port=0, progress=cb) as srv:
        host, port = srv.address       # port 0 picks a free one
        ...                            # close() (or leaving the block) stops everything
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from edgevirt.errors import DeployError

log = logging.getLogger(__name__)

# Opcodes (RFC 1350 section 5, RFC 2347 for OACK).
RRQ, WRQ, DATA, ACK, ERROR, OACK = 1, 2, 3, 4, 5, 6
# Error codes (RFC 1350 appendix, RFC 2347 for 8).
ERR_UNDEFINED, ERR_NOT_FOUND, ERR_ACCESS, ERR_DISK_FULL = 0, 1, 2, 3
ERR_ILLEGAL_OP, ERR_UNKNOWN_TID, ERR_EXISTS, ERR_NO_USER, ERR_OPTIONS = 4, 5, 6, 7, 8

DEFAULT_BLKSIZE = 512
BLKSIZE_MIN, BLKSIZE_MAX = 8, 65464  # RFC 2348
TIMEOUT_MIN, TIMEOUT_MAX = 1, 255  # RFC 2349
WINDOWSIZE_MAX = 64  # RFC 7440 allows 65535; more buys nothing on a LAN
_POLL = 0.2  # how often idle loops look at the stop flag


class TftpError(DeployError):
    """The TFTP server could not start (address in use, root not a directory)."""


class State(enum.Enum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass
class Transfer:
    """One read transfer, as a progress callback sees it."""

    id: int
    peer: tuple[str, int]
    filename: str
    mode: str
    size: int | None  # None for netascii (the converted size is not known up front)
    blksize: int = DEFAULT_BLKSIZE
    windowsize: int = 1
    timeout: float = 1.0
    options: dict[str, str] = field(default_factory=dict)  # what the OACK accepted
    sent: int = 0  # bytes the client acknowledged
    retransmits: int = 0
    state: State = State.RUNNING
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started


Progress = Callable[[Transfer], None]


class Refused(Exception):
    """A request answered with an ERROR packet (code, message)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def error_packet(code: int, message: str) -> bytes:
    return struct.pack("!HH", ERROR, code) + message.encode("ascii", "replace") + b"\0"


def parse_request(packet: bytes) -> tuple[int, str, str, dict[str, str]]:
    """``(opcode, filename, mode, options)`` of an RRQ/WRQ; options with lower-case names."""
    if len(packet) < 4:
        raise Refused(ERR_ILLEGAL_OP, f"packet of {len(packet)} bytes is too short")
    (op,) = struct.unpack_from("!H", packet)
    if op not in (RRQ, WRQ):
        raise Refused(ERR_ILLEGAL_OP, f"opcode {op} is not a request")
    fields = packet[2:].split(b"\0")
    if len(fields) < 3 or fields[-1] != b"":
        raise Refused(ERR_ILLEGAL_OP, "malformed request (fields not NUL-terminated)")
    fields = fields[:-1]
    try:
        name, mode, *rest = (f.decode("ascii") for f in fields)
    except UnicodeDecodeError as e:
        raise Refused(ERR_ILLEGAL_OP, "request is not ASCII") from e
    if len(rest) % 2:
        raise Refused(ERR_ILLEGAL_OP, f"option {rest[-1]!r} has no value")
    options = {rest[i].lower(): rest[i + 1] for i in range(0, len(rest), 2)}
    return op, name, mode.lower(), options


def resolve(root: Path, name: str) -> Path:
    """The file ``name`` names under ``root``; refuses anything that leaves it."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts:
        raise Refused(ERR_ACCESS, f"{name!r}: no file name")
    if ".." in parts or "\0" in name:
        raise Refused(ERR_ACCESS, f"{name!r}: path traversal refused")
    path = root.joinpath(*parts)
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError as e:
        raise Refused(ERR_NOT_FOUND, f"{name!r}: file not found") from e
    except (OSError, RuntimeError) as e:  # symlink loops, permission on a parent
        raise Refused(ERR_ACCESS, f"{name!r}: {e}") from e
    if not real.is_relative_to(root):
        raise Refused(ERR_ACCESS, f"{name!r}: resolves outside the served directory")
    if not real.is_file():
        raise Refused(ERR_ACCESS, f"{name!r}: not a regular file")
    return real


def negotiate(options: dict[str, str], size: int | None) -> dict[str, str]:
    """The options we accept, with the values we use (RFC 2347: unknown ones are ignored)."""
    accepted: dict[str, str] = {}
    for name, value in options.items():
        try:
            n = int(value)
        except ValueError:
            continue
        if name == "blksize" and n >= BLKSIZE_MIN:
            accepted[name] = str(min(n, BLKSIZE_MAX))
        elif name == "timeout" and TIMEOUT_MIN <= n <= TIMEOUT_MAX:
            accepted[name] = str(n)
        elif name == "tsize" and size:
            # Not for empty files: curl rejects "tsize 0" in an OACK as illegal.
            accepted[name] = str(size)
        elif name == "windowsize" and n >= 1:
            accepted[name] = str(min(n, WINDOWSIZE_MAX))
    return accepted


def _netascii(f: BinaryIO, chunk: int = 65536) -> Iterator[bytes]:
    """RFC 764 netascii: LF becomes CR LF, a bare CR becomes CR NUL."""
    while data := f.read(chunk):
        yield data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


class _Blocks:
    """The transfer's data as numbered blocks; keeps only the current window in memory."""

    def __init__(self, f: BinaryIO, blksize: int, netascii: bool) -> None:
        self._chunks = _netascii(f) if netascii else iter(lambda: f.read(blksize), b"")
        self._pending = b""
        self._eof = False
        self.blksize = blksize
        self.window: deque[bytes] = deque()  # blocks first..first+len-1, not yet acked
        self.first = 1  # block number (unwrapped) of window[0]
        self.last: int | None = None  # block number of the final (short) block

    def _next(self) -> bytes:
        while len(self._pending) < self.blksize and not self._eof:
            chunk = next(self._chunks, b"")
            if not chunk:
                self._eof = True
            self._pending += chunk
        out, self._pending = self._pending[: self.blksize], self._pending[self.blksize :]
        return out

    def fill(self, windowsize: int) -> None:
        while len(self.window) < windowsize:
            n = self.first + len(self.window)
            if self.last is not None and n > self.last:
                return
            block = self._next()
            self.window.append(block)
            if len(block) < self.blksize:
                self.last = n

    def ack(self, upto: int) -> int:
        """Drop blocks through ``upto``; return the bytes that acknowledged."""
        acked = 0
        while self.window and self.first <= upto:
            acked += len(self.window.popleft())
            self.first += 1
        return acked


class TftpServer:
    """Read-only TFTP over UDP, serving the files under ``root``."""

    def __init__(
        self,
        root: Path | str,
        host: str = "127.0.0.1",
        port: int = 69,
        *,
        timeout: float = 1.0,
        retries: int = 5,
        max_transfers: int = 8,
        progress: Progress | None = None,
        progress_interval: float = 0.1,
        history: int = 100,
    ) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise TftpError(f"tftp: {root} is not a directory")
        self.timeout = timeout
        self.retries = retries
        self.max_transfers = max_transfers
        self.progress = progress
        self.progress_interval = progress_interval
        self.host = host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self._sock.bind((host, port))
        except OSError as e:
            self._sock.close()
            raise TftpError(f"tftp: cannot bind {host}:{port}: {e}") from e
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._stop = threading.Event()
        self._slots = threading.BoundedSemaphore(max_transfers)
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._ids = itertools.count(1)
        self.active: dict[int, Transfer] = {}
        #: The last ``history`` finished transfers, oldest first.
        self.finished: deque[Transfer] = deque(maxlen=history)
        self._listener: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> TftpServer:
        if self._listener is None:
            self._listener = threading.Thread(target=self._listen, name="tftp-listen", daemon=True)
            self._listener.start()
            log.info("tftp: serving %s on %s:%d", self.root, *self.address)
        return self

    def close(self, grace: float = 5.0) -> None:
        """Stop listening, tell running transfers' clients, join every thread."""
        self._stop.set()
        if self._listener is not None:
            self._listener.join(grace)
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(grace)
        self._sock.close()

    def __enter__(self) -> TftpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`close` is called (or ``timeout``); True once stopped."""
        return self._stop.wait(timeout)

    # -- listener -------------------------------------------------------------------------

    def _listen(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._sock], [], [], _POLL)
            if not ready:
                continue
            try:
                packet, peer = self._sock.recvfrom(65536)
            except OSError as e:
                log.warning("tftp: recvfrom failed: %s", e)
                continue
            self._request(packet, peer[:2])

    def _request(self, packet: bytes, peer: tuple[str, int]) -> None:
        try:
            op, name, mode, options = parse_request(packet)
            if op == WRQ:
                raise Refused(ERR_ACCESS, f"{name!r}: write requests refused (read-only server)")
            if mode not in ("octet", "netascii"):
                raise Refused(ERR_ILLEGAL_OP, f"mode {mode!r} not supported")
            path = resolve(self.root, name)
            if not self._slots.acquire(blocking=False):
                raise Refused(ERR_UNDEFINED, f"server busy: {self.max_transfers} transfers running")
        except Refused as e:
            log.info("tftp: %s:%d refused (%d): %s", *peer, e.code, e.message)
            self._sock.sendto(error_packet(e.code, e.message), peer)
            return
        t = threading.Thread(
            target=self._run_slot,
            args=(peer, name, mode, options, path),
            name=f"tftp-{peer[0]}:{peer[1]}",
            daemon=True,
        )
        with self._lock:
            self._threads.add(t)
        t.start()

    # -- one transfer ---------------------------------------------------------------------

    def _run_slot(
        self, peer: tuple[str, int], name: str, mode: str, options: dict[str, str], path: Path
    ) -> None:
        try:
            self._transfer(peer, name, mode, options, path)
        except Exception:  # a bug must not take the server down: log it with the peer
            log.exception("tftp: transfer of %r to %s:%d crashed", name, *peer)
        finally:
            self._slots.release()
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _notify(self, t: Transfer) -> None:
        if self.progress is not None:
            try:
                self.progress(t)
            except Exception:
                log.exception("tftp: progress callback failed")

    def _transfer(
        self, peer: tuple[str, int], name: str, mode: str, options: dict[str, str], path: Path
    ) -> None:
        family = socket.AF_INET6 if ":" in peer[0] else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock, open(path, "rb") as f:
            sock.bind((self.host, 0))  # a fresh port: our TID for this transfer
            size = None if mode == "netascii" else os.fstat(f.fileno()).st_size
            accepted = negotiate(options, size)
            t = Transfer(
                id=next(self._ids),
                peer=peer,
                filename=name,
                mode=mode,
                size=size,
                blksize=int(accepted.get("blksize", DEFAULT_BLKSIZE)),
                windowsize=int(accepted.get("windowsize", 1)),
                timeout=float(accepted.get("timeout", self.timeout)),
                options=accepted,
            )
            with self._lock:
                self.active[t.id] = t
            log.info("tftp: #%d %s:%d %r %s %s", t.id, *peer, name, mode, accepted or "")
            self._notify(t)
            try:
                self._send(sock, t, f, accepted)
                t.state = State.DONE
            except Refused as e:
                t.state, t.error = State.FAILED, e.message
                try:
                    sock.sendto(error_packet(e.code, e.message), peer)
                except OSError:
                    pass  # nothing more to tell a client we cannot reach
            except _ClientError as e:
                t.state, t.error = State.FAILED, str(e)
            except OSError as e:
                t.state, t.error = State.FAILED, f"socket error: {e}"
            t.ended = time.monotonic()
            if t.state is State.DONE:
                log.info("tftp: #%d %r sent %d bytes in %.2fs", t.id, name, t.sent, t.seconds)
            else:
                log.warning("tftp: #%d %r to %s:%d failed: %s", t.id, name, *peer, t.error)
            with self._lock:
                self.active.pop(t.id, None)
                self.finished.append(t)
            self._notify(t)

    def _exchange(
        self, sock: socket.socket, t: Transfer, packets: list[bytes], send: bool = True
    ) -> bytes:
        """Send ``packets`` (unless ``send`` is False: they are out already); return the
        client's next packet, resending them on each timeout."""
        for attempt in range(self.retries + 1):
            if attempt:
                t.retransmits += 1
            for p in packets if send or attempt else []:
                sock.sendto(p, t.peer)
            deadline = time.monotonic() + t.timeout
            while (left := deadline - time.monotonic()) > 0:
                if self._stop.is_set():
                    raise Refused(ERR_UNDEFINED, "server shutting down")
                ready, _, _ = select.select([sock], [], [], min(left, _POLL))
                if not ready:
                    continue
                reply, src = sock.recvfrom(65536)
                if src[:2] == t.peer:
                    return reply
                # RFC 1350 section 4: a stranger gets error 5; the transfer goes on.
                log.info("tftp: #%d packet from unknown TID %s:%d", t.id, *src[:2])
                sock.sendto(error_packet(ERR_UNKNOWN_TID, "unknown transfer ID"), src)
        raise Refused(
            ERR_UNDEFINED,
            f"timed out: no ACK within {t.timeout:g}s after {self.retries + 1} sends",
        )

    def _send(
        self, sock: socket.socket, t: Transfer, f: BinaryIO, accepted: dict[str, str]
    ) -> None:
        if accepted:
            oack = struct.pack("!H", OACK) + b"".join(
                k.encode() + b"\0" + v.encode() + b"\0" for k, v in accepted.items()
            )
            send = True
            while True:
                reply = self._exchange(sock, t, [oack], send)
                op, arg = _ack_or_error(reply)
                if op == ACK and arg == 0:
                    break
                send = False  # anything else is ignored; the OACK goes again on timeout
        blocks = _Blocks(f, t.blksize, t.mode == "netascii")
        last_note = 0.0
        send = True
        while True:
            blocks.fill(t.windowsize)
            if not blocks.window:
                return  # the final block was acknowledged
            packets = [
                struct.pack("!HH", DATA, (blocks.first + i) & 0xFFFF) + b
                for i, b in enumerate(blocks.window)
            ]
            reply = self._exchange(sock, t, packets, send)
            op, arg = _ack_or_error(reply)
            acked = _unwrap(arg, blocks.first - 1, len(blocks.window))
            if acked is None:
                # A duplicate or stale ACK: resending on it would double every packet from
                # then on (the Sorcerer's Apprentice bug); only a timeout resends.
                send = False
                continue
            send = True
            t.sent += blocks.ack(acked)
            now = time.monotonic()
            more = blocks.last is None or blocks.first <= blocks.last  # the end is notified
            if more and now - last_note >= self.progress_interval:
                last_note = now
                self._notify(t)


class _ClientError(Exception):
    """The client ended the transfer with an ERROR packet."""


def _ack_or_error(packet: bytes) -> tuple[int, int]:
    if len(packet) < 4:
        return 0, 0
    op, arg = struct.unpack_from("!HH", packet)
    if op == ERROR:
        msg = packet[4:].split(b"\0", 1)[0].decode("ascii", "replace")
        raise _ClientError(f"client sent error {arg}: {msg}")
    if op != ACK:
        raise Refused(ERR_ILLEGAL_OP, f"expected ACK, got opcode {op}")
    return op, arg


def _unwrap(block: int, base: int, window: int) -> int | None:
    """The unwrapped block number an ACK of ``block`` (16 bits) means, if it acks any of the
    ``window`` blocks after ``base``; None for duplicates of earlier ACKs."""
    delta = (block - base) & 0xFFFF
    return base + delta if 1 <= delta <= window else None
