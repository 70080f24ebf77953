"""virtio-vsock (virtio spec 5.10), stream sockets, hybrid mode: each guest port is a unix
socket on the back-end's side.

Queues: 0 rx (device → driver), 1 tx, 2 event (its buffers are kept, never used: there is
no migration to announce). Config: ``le64 guest_cid``. The host is CID 2.

- The guest connects to host port P → the back-end connects to ``<dir>/vsock_<P>``; if
  nothing listens there the guest gets RST (its ``connect()`` fails with ECONNRESET).
- A host program connects to ``<dir>/vsock`` and writes ``CONNECT <guest port>\\n``; once
  the guest accepts it reads ``OK <host port>\\n`` and the stream follows (the protocol
  Firecracker and vhost-device-vsock use); a refused connection is closed.

Flow control is the spec's credit scheme, per connection: the back-end advertises
``buf_alloc`` bytes and forwards guest data to the unix socket as it becomes writable,
holding at most ``buf_alloc`` unsent bytes (a guest that overruns its credit is reset);
it reads from the unix socket only while the guest has credit *and* a receive buffer waits,
straight into that buffer (deferred receive chains, as in net). Control packets waiting
for a receive buffer are bounded too (dropped and counted past :data:`MAX_CONTROL`).

Hostile driver rules: a transmit chain shorter than the 44-byte header, with writable
buffers, whose ``len`` disagrees with its payload or exceeds :data:`MAX_PAYLOAD`, with a
wrong source CID, destination CID or type is dropped and counted (answered with RST where
it names a connection); an unknown op is answered with RST. None of this touches other
connections, the queue or the process. A unix peer that hangs up mid-stream ends that
connection only (SHUTDOWN to the guest, then RST).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from edgevirt.backend.devices.base import DEFERRED, Chain, VirtioDevice, gather, scatter, views
from edgevirt.backend.memory import GuestMemory
from edgevirt.errors import BackendError, ConfigError

log = logging.getLogger(__name__)

RX, TX, EVENT = 0, 1, 2
HOST_CID = 2
#: struct virtio_vsock_hdr: src_cid, dst_cid, src_port, dst_port, len, type, op, flags,
#: buf_alloc, fwd_cnt.
HDR = struct.Struct("<QQIIIHHIII")
assert HDR.size == 44
TYPE_STREAM = 1
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = (
    1, 2, 3, 4, 5, 6, 7,
)  # fmt: skip
OP_NAMES = {1: "request", 2: "response", 3: "rst", 4: "shutdown", 5: "rw",
            6: "credit_update", 7: "credit_request"}  # fmt: skip
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2
MAX_PAYLOAD = 64 * 1024
MAX_CONTROL = 1024
MAX_CONNECTIONS = 1024
DEFAULT_BUF_ALLOC = 256 * 1024
#: Receive chains filled per wake-up before other fds get a turn.
RX_BURST = 64
LOCAL_PORT_BASE = 1 << 30  # host ports for host-initiated connections


@dataclass(eq=False)  # identity: the ready queue holds connections, not their values
class Conn:
    """One stream: ``host_port`` on CID 2, ``guest_port`` on the guest's CID."""

    host_port: int
    guest_port: int
    sock: socket.socket
    established: bool = False
    host_initiated: bool = False
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0  # bytes sent to the guest
    fwd_cnt: int = 0  # guest bytes written to the unix socket
    fwd_announced: int = 0
    out: bytearray = field(default_factory=bytearray)  # guest → socket, not yet written
    readable: bool = False
    eof_from_host: bool = False
    guest_done_sending: bool = False
    handshake: bytearray = field(default_factory=bytearray)

    @property
    def key(self) -> tuple[int, int]:
        return self.host_port, self.guest_port

    def credit(self) -> int:
        return max(0, self.peer_buf_alloc - (self.tx_cnt - self.peer_fwd_cnt))


class VsockDevice(VirtioDevice):
    name = "vsock"
    device_id = 19
    num_queues = 3

    def __init__(self, guest_cid: int, directory: str | os.PathLike[str],
                 buf_alloc: int | None = None) -> None:  # fmt: skip
        super().__init__()
        if not 3 <= guest_cid < 0xFFFFFFFF:
            raise ConfigError(f"vsock: cid={guest_cid}: a guest CID is 3..2^32-2 (0-2 reserved)")
        self.buf_alloc = DEFAULT_BUF_ALLOC if buf_alloc is None else buf_alloc
        if not 4096 <= self.buf_alloc <= 1 << 24:
            raise ConfigError(f"vsock: buf_alloc={self.buf_alloc}, expected 4096..16777216")
        self.cid = guest_cid
        self.dir = Path(directory)
        try:  # a service VM's /run starts empty: make the directory
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"vsock: dir={self.dir}: {e.strerror}") from e
        self.conns: dict[tuple[int, int], Conn] = {}
        self.rx: deque[Chain] = deque()
        self.events: list[Chain] = []
        self.control: deque[bytes] = deque()
        self.ready: deque[Conn] = deque()
        self.pending_host: list[Conn] = []  # accepted on <dir>/vsock, no CONNECT line yet
        self._next_port = LOCAL_PORT_BASE
        self.listen_path = self.dir / "vsock"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.listen_path.unlink(missing_ok=True)
            self.listener.bind(str(self.listen_path))
            self.listener.listen(16)
        except OSError as e:
            self.listener.close()
            raise BackendError(f"vsock: cannot listen on {self.listen_path}: {e.strerror}") from e
        self.listener.setblocking(False)

    def attach(self, host) -> None:  # type: ignore[no-untyped-def]
        super().attach(host)
        host.add_reader(self.listener.fileno(), self._accept)

    def config(self) -> bytes:
        return struct.pack("<Q", self.cid)

    def snapshot(self) -> dict:
        return {"connections": len(self.conns), "rx_buffers_waiting": len(self.rx),
                "control_waiting": len(self.control), "listen": str(self.listen_path)}  # fmt: skip

    # -- lifetime -------------------------------------------------------------------------

    def queue_stopped(self, queue: int) -> None:
        if queue == RX:
            self.rx.clear()
        elif queue == EVENT:
            self.events.clear()

    def reset(self) -> None:
        super().reset()
        for conn in list(self.conns.values()):
            self._close(conn, "device reset")
        self.control.clear()

    def close(self) -> None:
        self.reset()
        for conn in self.pending_host:
            conn.sock.close()
        self.pending_host.clear()
        if self.host is not None:
            self.host.remove_reader(self.listener.fileno())
        self.listener.close()
        self.listen_path.unlink(missing_ok=True)

    def _drop(self, why: str) -> None:
        self.stats.errors += 1
        self.stats.count(why)

    # -- packets to the guest -------------------------------------------------------------

    def _packet(self, conn_or_ports: Conn | tuple[int, int], op: int, length: int = 0,
                flags: int = 0) -> bytes:  # fmt: skip
        if isinstance(conn_or_ports, Conn):
            c = conn_or_ports
            src, dst, fwd = c.host_port, c.guest_port, c.fwd_cnt
            c.fwd_announced = fwd
        else:
            (src, dst), fwd = conn_or_ports, 0
        return HDR.pack(HOST_CID, self.cid, src, dst, length, TYPE_STREAM, op, flags,
                        self.buf_alloc, fwd)  # fmt: skip

    def _send_control(self, pkt: bytes) -> None:
        if len(self.control) >= MAX_CONTROL:
            self._drop("control_dropped")
            return
        self.control.append(pkt)

    def _rst(self, ports: tuple[int, int]) -> None:
        self._send_control(self._packet(ports, OP_RST))

    # -- chains ---------------------------------------------------------------------------

    def handle(self, queue: int, chain: Chain, mem: GuestMemory) -> int:
        if queue == EVENT:
            self.events.append(chain)
            return DEFERRED
        if queue == RX:
            if chain.readable or chain.writable_len < HDR.size:
                self._drop("rx_bad_chain")
                return 0
            self.rx.append(chain)
            self._pump()
            return DEFERRED
        if queue != TX:
            raise BackendError(f"vsock: chain {chain.head} on queue {queue}, device has 3")
        self._transmit(chain, mem)
        self._pump()
        return 0

    def _transmit(self, chain: Chain, mem: GuestMemory) -> None:
        self.stats.requests += 1
        total = chain.readable_len
        if chain.writable or total < HDR.size:
            log.warning("vsock: transmit chain %d: %d readable / %d writable bytes, expected "
                        "a %d-byte header, read-only", chain.head, total, chain.writable_len,
                        HDR.size)  # fmt: skip
            self._drop("tx_bad_chain")
            return
        (src_cid, dst_cid, src_port, dst_port, length, typ, op, flags, buf_alloc,
         fwd_cnt) = HDR.unpack(gather(mem, chain.readable, HDR.size))  # fmt: skip
        ports = (dst_port, src_port)
        where = f"vsock: {OP_NAMES.get(op, op)} {src_cid}:{src_port} -> {dst_cid}:{dst_port}"
        if length != total - HDR.size or length > MAX_PAYLOAD:
            log.warning("%s: len %d, payload %d bytes (max %d)", where, length,
                        total - HDR.size, MAX_PAYLOAD)  # fmt: skip
            self._drop("tx_bad_len")
            if op != OP_RST:
                self._rst(ports)
            return
        if src_cid != self.cid or dst_cid != HOST_CID:
            log.warning("%s: expected source CID %d and destination CID %d", where, self.cid,
                        HOST_CID)  # fmt: skip
            self._drop("tx_bad_cid")
            return
        if typ != TYPE_STREAM:
            log.warning("%s: type %d, only stream (1) is offered", where, typ)
            self._drop("tx_bad_type")
            if op != OP_RST:
                self._rst(ports)
            return
        self.stats.count(OP_NAMES.get(op, "unknown_op"))
        conn = self.conns.get(ports)
        if conn is not None:
            conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
        if op == OP_REQUEST:
            self._guest_connects(ports, buf_alloc, fwd_cnt)
        elif op == OP_RST:
            if conn is not None:
                self._close(conn, "reset by the guest", rst=False)
        elif conn is None:
            self._drop("tx_unknown_connection")
            self._rst(ports)
        elif op == OP_RESPONSE:
            self._guest_accepted(conn)
        elif op == OP_RW:
            self._from_guest(conn, views(mem, chain.readable, skip=HDR.size), length)
        elif op == OP_CREDIT_UPDATE:
            if conn.credit() and conn.readable and conn not in self.ready:
                self.ready.append(conn)
        elif op == OP_CREDIT_REQUEST:
            self._send_control(self._packet(conn, OP_CREDIT_UPDATE))
        elif op == OP_SHUTDOWN:
            self._guest_shutdown(conn, flags)
        else:
            log.warning("%s: unknown op", where)
            self._drop("tx_bad_op")
            self._close(conn, f"unknown op {op}")

    # -- connections ----------------------------------------------------------------------

    def _guest_connects(self, ports: tuple[int, int], buf_alloc: int, fwd_cnt: int) -> None:
        host_port, guest_port = ports
        if ports in self.conns or len(self.conns) >= MAX_CONNECTIONS:
            self._drop("request_refused")
            self._rst(ports)
            return
        path = self.dir / f"vsock_{host_port}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(str(path))
        except OSError as e:
            sock.close()
            log.info("vsock: guest port %d -> host port %d: %s: %s", guest_port, host_port,
                     path, e.strerror)  # fmt: skip
            self.stats.count("request_no_listener")
            self._rst(ports)
            return
        conn = Conn(host_port, guest_port, sock, established=True,
                    peer_buf_alloc=buf_alloc, peer_fwd_cnt=fwd_cnt)  # fmt: skip
        self.conns[ports] = conn
        self._watch(conn)
        self._send_control(self._packet(conn, OP_RESPONSE))
        log.info("vsock: guest port %d connected to %s", guest_port, path)

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        sock.setblocking(False)
        if len(self.pending_host) + len(self.conns) >= MAX_CONNECTIONS:
            sock.close()
            return
        conn = Conn(0, 0, sock, host_initiated=True)
        self.pending_host.append(conn)
        assert self.host is not None
        self.host.add_reader(sock.fileno(), lambda: self._handshake(conn))

    def _handshake(self, conn: Conn) -> None:
        assert self.host is not None
        try:
            data = conn.sock.recv(64 - len(conn.handshake))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        conn.handshake += data
        if b"\n" not in conn.handshake:
            if data and len(conn.handshake) < 64:
                return
            self._abandon(conn, "no CONNECT line")
            return
        line, _, rest = bytes(conn.handshake).partition(b"\n")
        words = line.split()
        if len(words) != 2 or words[0] != b"CONNECT" or not words[1].isdigit() or rest:
            conn.sock.sendall(b"ERR expected 'CONNECT <port>\\n'\n")
            self._abandon(conn, f"bad handshake {line[:40]!r}")
            return
        self.pending_host.remove(conn)
        self.host.remove_reader(conn.sock.fileno())
        conn.guest_port = int(words[1]) & 0xFFFFFFFF
        conn.host_port = self._next_port
        self._next_port = LOCAL_PORT_BASE + (self._next_port + 1 - LOCAL_PORT_BASE) % (1 << 30)
        self.conns[conn.key] = conn
        self._send_control(self._packet(conn, OP_REQUEST))
        self._pump()

    def _abandon(self, conn: Conn, why: str) -> None:
        log.warning("vsock: host connection on %s dropped: %s", self.listen_path, why)
        assert self.host is not None
        self.host.remove_reader(conn.sock.fileno())
        self.pending_host.remove(conn)
        conn.sock.close()

    def _guest_accepted(self, conn: Conn) -> None:
        if conn.established or not conn.host_initiated:
            self._drop("tx_unexpected_response")
            self._close(conn, "unexpected RESPONSE")
            return
        conn.established = True
        try:
            conn.sock.sendall(f"OK {conn.host_port}\n".encode())
        except OSError:
            self._close(conn, "host side gone before OK")
            return
        self._watch(conn)

    def _watch(self, conn: Conn) -> None:
        assert self.host is not None
        self.host.add_reader(conn.sock.fileno(), lambda: self._sock_readable(conn))

    def _sock_readable(self, conn: Conn) -> None:
        assert self.host is not None
        self.host.remove_reader(conn.sock.fileno())  # until we have a buffer and credit
        conn.readable = True
        if conn not in self.ready:
            self.ready.append(conn)
        self._pump()

    def _close(self, conn: Conn, why: str, rst: bool = True) -> None:
        if self.conns.pop(conn.key, None) is None:
            return
        log.info("vsock: host port %d <-> guest port %d closed: %s", conn.host_port,
                 conn.guest_port, why)  # fmt: skip
        if self.host is not None:
            self.host.remove_reader(conn.sock.fileno())
            self.host.remove_writer(conn.sock.fileno())
        conn.sock.close()
        if conn in self.ready:
            self.ready.remove(conn)
        if rst:
            self._rst(conn.key)

    def _guest_shutdown(self, conn: Conn, flags: int) -> None:
        if flags & SHUTDOWN_SEND:
            conn.guest_done_sending = True
            self._flush(conn)
        if flags & SHUTDOWN_RCV and flags & SHUTDOWN_SEND:
            self._close(conn, "shut down by the guest")

    def _from_guest(self, conn: Conn, bufs: list[memoryview], length: int) -> None:
        if not conn.established:
            self._close(conn, "data before the connection was established")
            return
        if len(conn.out) + length > self.buf_alloc:
            log.warning("vsock: guest port %d overran its credit (%d + %d > %d bytes): reset",
                        conn.guest_port, len(conn.out), length, self.buf_alloc)  # fmt: skip
            self._drop("credit_overrun")
            self._close(conn, "credit overrun")
            return
        for b in bufs:
            conn.out += b
        self.stats.bytes_read += length
        self._flush(conn)

    def _flush(self, conn: Conn) -> None:
        assert self.host is not None
        fd = conn.sock.fileno()
        while conn.out:
            try:
                n = conn.sock.send(conn.out)
            except BlockingIOError:
                self.host.add_writer(fd, lambda: self._flush(conn))
                return
            except OSError as e:
                self._host_hung_up(conn, e.strerror or str(e))
                return
            del conn.out[:n]
            conn.fwd_cnt += n
        self.host.remove_writer(fd)
        if conn.guest_done_sending:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            if conn.eof_from_host:  # both directions ended and delivered
                self._close(conn, "both sides done sending")
                return
        # Announce freed credit once a quarter of the window is free again.
        if conn.fwd_cnt - conn.fwd_announced >= self.buf_alloc // 4:
            self._send_control(self._packet(conn, OP_CREDIT_UPDATE))
            self._pump()

    def _host_hung_up(self, conn: Conn, why: str) -> None:
        self.stats.count("host_hangups")
        self._close(conn, f"unix peer hung up: {why}")

    # -- the receive pump -----------------------------------------------------------------

    def _pump(self) -> None:
        host = self.host
        if host is None or not self.rx:
            return
        mem = host.mem
        done: list[tuple[Chain, int]] = []
        try:
            while self.rx and len(done) < RX_BURST:
                if self.control:
                    chain = self.rx.popleft()
                    pkt = self.control.popleft()
                    scatter(views(mem, chain.writable), pkt)
                    done.append((chain, len(pkt)))
                    continue
                if not self._data_packet(mem, done):
                    break
        except BackendError as e:
            log.error("vsock: receive buffer: %s", e)
            self._drop("rx_bad_buffer")
        finally:
            if done:
                host.complete(RX, done)

    def _data_packet(self, mem: GuestMemory, done: list[tuple[Chain, int]]) -> bool:
        for _ in range(len(self.ready)):
            conn = self.ready.popleft()
            if conn.key not in self.conns:
                continue
            credit = conn.credit()
            if not credit:
                self.ready.append(conn)  # wait for CREDIT_UPDATE
                continue
            chain = self.rx.popleft()
            bufs = _limit(views(mem, chain.writable, skip=HDR.size), min(credit, MAX_PAYLOAD))
            if not bufs:  # a buffer with room for a header only: useless for data
                self.ready.appendleft(conn)
                self._drop("rx_small_buffer")
                done.append((chain, 0))
                return True
            try:
                n = conn.sock.recvmsg_into(bufs)[0]
            except BlockingIOError:
                self.rx.appendleft(chain)
                conn.readable = False
                self._watch(conn)
                continue
            except OSError as e:
                self.rx.appendleft(chain)
                self._host_hung_up(conn, e.strerror or str(e))
                continue
            if n == 0:
                # EOF: the unix peer will send no more. It may only have shut down its
                # writing half and still read, so the guest may go on sending (a peer that
                # closed altogether makes the next send fail: then RST).
                conn.eof_from_host = True
                conn.readable = False
                pkt = self._packet(conn, OP_SHUTDOWN, flags=SHUTDOWN_SEND)
            else:
                pkt = self._packet(conn, OP_RW, n)
                conn.tx_cnt += n
                self.stats.bytes_written += n
                self.ready.append(conn)
            scatter(views(mem, chain.writable), pkt)
            done.append((chain, HDR.size + n))
            return True
        return False


def _limit(bufs: list[memoryview], n: int) -> list[memoryview]:
    out = []
    for b in bufs:
        if n <= 0:
            break
        out.append(b[:n])
        n -= len(out[-1])
    return out
