"""The ivshmem server protocol (QEMU ``docs/specs/ivshmem-spec.rst``), both ends.

The back-end is the server *and* a peer: it owns the shared memory and its own eventfds,
and every client (QEMU's ``ivshmem-doorbell``, or the Python test peer) is told about it as
an already-connected peer. Messages are single little-endian int64s, some with one fd
(SCM_RIGHTS). On connect the server sends, in order:

1. the protocol version, 0;
2. the client's ID;
3. -1 with the shared-memory fd;
4. for every other peer (here: the back-end), its ID once per vector, each with the eventfd
   that interrupts that peer on that vector;
5. the client's own ID once per vector, each with the eventfd it receives interrupts on.

Later, a peer ID with an fd announces a peer, without one says it has gone. A doorbell is
a write of the 8-byte integer 1 to an eventfd; the receiver reads it back to zero.

This bus serves one driver at a time: a second client is refused (its socket closed).
"""

from __future__ import annotations

import array
import logging
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from edgevirt.backend.transport.virtio_msg.protocol import VirtioMsgError

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 0
MSG = struct.Struct("<q")
ONE = struct.pack("<Q", 1)
SEND_TIMEOUT = 5.0
MAX_ID = 0xFFFF


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def ring(fd: int) -> None:
    """Raise an interrupt on an eventfd (a full counter just means one is already pending)."""
    try:
        os.write(fd, ONE)
    except BlockingIOError:
        pass


def drain(fd: int) -> int:
    """Read an eventfd back to zero; returns how many doorbells it had counted (0 when
    none: the fd is non-blocking). The service VM's and the Xen service domain's doorbell
    devices (``/dev/ivshmem-*`` of ev_ivshmem, ``/dev/ev-evtchn`` of ev_evtchn) read alike."""
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0


def _send(sock: socket.socket, value: int, fd: int | None = None) -> None:
    anc = [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
    sock.sendmsg([MSG.pack(value)], anc)


@dataclass
class Client:
    id: int
    sock: socket.socket
    eventfds: list[int] = field(default_factory=list)  # interrupt this client on vector i

    def close(self) -> None:
        for fd in self.eventfds:
            os.close(fd)
        self.eventfds = []
        self.sock.close()


class IvshmemServer:
    """Listen on ``path``; hand out ``shm_fd``; the back-end itself is peer ``own_id``."""

    def __init__(
        self,
        path: str,
        shm_fd: int,
        vectors: int,
        *,
        own_id: int = 0,
        on_connect: Callable[[Client], None] | None = None,
        on_disconnect: Callable[[Client], None] | None = None,
    ) -> None:
        if not 1 <= vectors <= 64:
            raise VirtioMsgError(f"{vectors} interrupt vectors: expected 1..64")
        self.path = path
        self.shm_fd = shm_fd
        self.vectors = vectors
        self.own_id = own_id
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.client: Client | None = None
        self.connections = 0
        self.refused = 0
        self._next_id = 1
        self.own_eventfds = [eventfd() for _ in range(vectors)]  # peers interrupt us here
        try:
            if os.path.exists(path):
                os.unlink(path)
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            self.listener.bind(path)
            self.listener.listen(2)
        except OSError as e:
            self._close_own()
            raise VirtioMsgError(
                f"ivshmem server: cannot listen on {path}: {e.strerror or e}"
            ) from e
        self.listener.setblocking(False)

    def _close_own(self) -> None:
        for fd in self.own_eventfds:
            os.close(fd)
        self.own_eventfds = []

    def _pick_id(self) -> int:
        """IDs count up (1..65535, skipping ours), so a reconnected client is told apart."""
        while True:
            cid = self._next_id
            self._next_id = cid % MAX_ID + 1
            if cid != self.own_id:
                return cid

    def accept(self) -> Client | None:
        """Accept and set up one waiting client (call when the listener is readable)."""
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return None
        if self.client is not None:
            self.refused += 1
            log.warning(
                "ivshmem server: refusing a second client (peer %d is connected)", self.client.id
            )
            sock.close()
            return None
        sock.settimeout(SEND_TIMEOUT)
        client = Client(self._pick_id(), sock, [eventfd() for _ in range(self.vectors)])
        try:
            _send(sock, PROTOCOL_VERSION)
            _send(sock, client.id)
            _send(sock, -1, self.shm_fd)
            for fd in self.own_eventfds:  # step 4: the back-end is an existing peer
                _send(sock, self.own_id, fd)
            for fd in client.eventfds:  # step 5: interrupt setup for the client
                _send(sock, client.id, fd)
        except OSError as e:
            log.error("ivshmem server: setting up client %d failed: %s", client.id, e)
            client.close()
            return None
        self.client = client
        self.connections += 1
        log.info("ivshmem server: peer %d connected on %s", client.id, self.path)
        if self.on_connect:
            self.on_connect(client)
        return client

    def client_readable(self) -> None:
        """Clients never send anything: data or EOF both end the connection."""
        if self.client is None:
            return
        try:
            data = self.client.sock.recv(64, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            log.warning(
                "ivshmem server: peer %d sent %d unexpected bytes", self.client.id, len(data)
            )
        self.disconnect()

    def disconnect(self) -> None:
        client, self.client = self.client, None
        if client is None:
            return
        log.info("ivshmem server: peer %d disconnected", client.id)
        if self.on_disconnect:
            self.on_disconnect(client)
        client.close()

    def interrupt(self, vector: int) -> bool:
        """Ring the connected client's ``vector``; False when nobody is connected."""
        if self.client is None or not 0 <= vector < len(self.client.eventfds):
            return False
        ring(self.client.eventfds[vector])
        return True

    def close(self) -> None:
        self.disconnect()
        self.listener.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass
        self._close_own()


@dataclass
class Peer:
    """What a client learned from the server."""

    id: int
    shm_fd: int
    eventfds: dict[int, list[int]]  # peer id -> eventfds to interrupt it (by vector)
    own: list[int]  # eventfds we are interrupted on (by vector)
    sock: socket.socket

    def close(self) -> None:
        for fds in self.eventfds.values():
            for fd in fds:
                os.close(fd)
        for fd in self.own:
            os.close(fd)
        if self.shm_fd >= 0:
            os.close(self.shm_fd)
        self.eventfds, self.own, self.shm_fd = {}, [], -1
        self.sock.close()


def _recv(sock: socket.socket, deadline: float) -> tuple[int, int | None]:
    fds = array.array("i")
    data = b""
    got: list[int] = []
    while len(data) < MSG.size:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            for fd in got:
                os.close(fd)
            raise VirtioMsgError("ivshmem client: server went quiet during setup")
        chunk, anc, _, _ = sock.recvmsg(
            MSG.size - len(data), socket.CMSG_SPACE(4 * fds.itemsize), socket.MSG_CMSG_CLOEXEC
        )
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
                got += list(fds)
                del fds[:]
        if not chunk:
            for fd in got:
                os.close(fd)
            raise VirtioMsgError("ivshmem client: server closed the connection during setup")
        data += chunk
    if len(got) > 1:
        for fd in got:
            os.close(fd)
        raise VirtioMsgError(f"ivshmem client: {len(got)} fds on one message, expected at most 1")
    return MSG.unpack(data)[0], (got[0] if got else None)


def connect(path: str, vectors: int, timeout: float = 5.0) -> Peer:
    """Connect like QEMU's ivshmem-doorbell does and collect the setup messages."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.connect(path)
    peer = Peer(-1, -1, {}, [], sock)
    deadline = time.monotonic() + timeout
    try:
        version, fd = _recv(sock, deadline)
        if version != PROTOCOL_VERSION or fd is not None:
            raise VirtioMsgError(f"ivshmem client: protocol version {version}, expected 0")
        peer.id, fd = _recv(sock, deadline)
        if fd is not None or not 0 <= peer.id <= MAX_ID:
            raise VirtioMsgError(f"ivshmem client: bad client id {peer.id}")
        marker, fd = _recv(sock, deadline)
        if marker != -1 or fd is None:
            raise VirtioMsgError("ivshmem client: expected -1 with the shared-memory fd")
        peer.shm_fd = fd
        while len(peer.own) < vectors:
            pid, fd = _recv(sock, deadline)
            if fd is None:
                peer.eventfds.pop(pid, None)
                continue
            (peer.own if pid == peer.id else peer.eventfds.setdefault(pid, [])).append(fd)
    except BaseException:
        peer.close()
        raise
    return peer
