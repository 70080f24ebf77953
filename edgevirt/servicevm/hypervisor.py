"""The host's whole part in the two-VM picture: shared-memory files and doorbell wiring.

This is deliberately small and knows nothing of virtio (it imports no edgevirt code and
never reads the shared memory). It plays what a Type-1 hypervisor does for two partitions:

* it **owns the shared memory**: the carve-out file (the front-end VM's NUMA node 1, the
  service VM's ``ivshmem-plain`` BAR2) and the message-memory file (both VMs'
  ``ivshmem-doorbell`` BAR2), created zeroed at start and unlinked at exit;
* it **wires the doorbells**: an ivshmem server (QEMU ``docs/specs/ivshmem-spec.rst``)
  with one listening socket per VM, each with a *fixed* peer ID, so each side knows whom
  to ring and a restarted VM comes back under the same ID. On connect a peer gets the
  version (0), its ID, the message-memory fd (-1 + fd), every other connected peer's
  eventfds (ID + fd per vector), then its own; the others learn the newcomer's eventfds.
  QEMU rings a peer by writing that peer's eventfd directly: after setup no doorbell passes
  through this process.
* it **survives a VM's restart**: a peer's doorbells (eventfds) are created on its first
  attach and kept until this process exits, like a hypervisor's fixed doorbell IDs. A
  hang-up (its QEMU was killed) is *not* announced; the next QEMU on that socket is the
  same peer ID and gets the same eventfds, so the others keep ringing it unchanged. (QEMU
  7.2's ivshmem frees a peer's eventfd array on a disconnect message and writes into it on
  the next connect of that ID: announcing the hang-up crashed the other VM's QEMU.) The
  shared files are kept too: what the VMs agreed on in shared memory outlives either of
  them (the virtio-msg epoch does the rest).

Its state (who is connected, how often) is rewritten to a JSON file on every change, which
is how the launcher tells "the service VM never attached" from "its back-end died".
Run as ``python -m edgevirt.servicevm.hypervisor``; it prints nothing, logs to stderr.
"""

from __future__ import annotations

import argparse
import array
import json
import logging
import os
import select
import selectors
import signal
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

MSG = struct.Struct("<q")
VERSION = 0


@dataclass
class PeerSlot:
    role: str
    socket_path: Path
    id: int
    listener: socket.socket | None = None
    conn: socket.socket | None = None
    eventfds: list[int] = field(default_factory=list)
    connections: int = 0
    detaches: int = 0
    refused: int = 0
    changed: float = 0.0  # time.time() of the last attach or detach


def _send(sock: socket.socket, value: int, fd: int | None = None) -> None:
    anc = [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
    sock.sendmsg([MSG.pack(value)], anc)


def _shared_file(path: Path, size: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    os.ftruncate(fd, size)
    return fd


class Hypervisor:
    def __init__(
        self,
        carveout: Path,
        carveout_size: int,
        msg: Path,
        msg_size: int,
        peers: Sequence[tuple[str, Path, int]],
        vectors: int = 2,
        state: Path | None = None,
    ) -> None:
        ids = [p[2] for p in peers]
        if len(set(ids)) != len(ids) or any(not 0 <= i <= 0xFFFF for i in ids):
            raise ValueError(f"peer ids {ids} must be distinct and within 0..65535")
        self.files = [carveout, msg]
        self.vectors = vectors
        self.state = state
        self.sel = selectors.DefaultSelector()
        self.slots = [PeerSlot(role, path, pid) for role, path, pid in peers]
        os.close(_shared_file(carveout, carveout_size))
        self.msg_fd = _shared_file(msg, msg_size)
        for slot in self.slots:
            slot.socket_path.unlink(missing_ok=True)
            lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            lst.bind(str(slot.socket_path))
            lst.listen(2)
            lst.setblocking(False)
            slot.listener = lst
            self.sel.register(lst, selectors.EVENT_READ, ("accept", slot))
        self.running = True
        self.write_state()

    def _connected(self) -> list[PeerSlot]:
        return [s for s in self.slots if s.conn is not None]

    def _known(self) -> list[PeerSlot]:
        """Peers with doorbells: attached now, or earlier (kept for their return)."""
        return [s for s in self.slots if s.eventfds]

    def accept(self, slot: PeerSlot) -> None:
        assert slot.listener is not None
        try:
            conn, _ = slot.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if slot.conn is not None and self._gone(slot.conn):
            self.hangup(slot)  # its EOF is still queued: the restart came first
        if slot.conn is not None:
            log.warning("%s: second connection refused (peer %d is attached)", slot.role, slot.id)
            slot.refused += 1
            conn.close()
            return
        conn.settimeout(5.0)
        returning = bool(slot.eventfds)
        fds = slot.eventfds or [
            os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(self.vectors)
        ]
        try:
            _send(conn, VERSION)
            _send(conn, slot.id)
            _send(conn, -1, self.msg_fd)
            for other in self._known():
                if other is not slot:
                    for fd in other.eventfds:
                        _send(conn, other.id, fd)
            for fd in fds:
                _send(conn, slot.id, fd)
        except OSError as e:
            log.error("%s: setup of peer %d failed: %s", slot.role, slot.id, e)
            if not returning:
                for fd in fds:
                    os.close(fd)
            conn.close()
            return
        for other in [] if returning else self._connected():  # a returning peer: known
            assert other.conn is not None
            try:
                for fd in fds:
                    _send(other.conn, slot.id, fd)
            except OSError as e:
                log.error("%s: cannot tell peer %d about %d: %s", other.role, other.id, slot.id, e)
        slot.conn, slot.eventfds = conn, fds
        slot.connections += 1
        slot.changed = time.time()
        self.sel.register(conn, selectors.EVENT_READ, ("hangup", slot))
        log.info("%s: peer %d attached (connection %d)", slot.role, slot.id, slot.connections)
        self.write_state()

    @staticmethod
    def _gone(conn: socket.socket) -> bool:
        if not select.select([conn], [], [], 0)[0]:
            return False  # (recv would wait: the socket has a timeout)
        try:
            return conn.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def hangup(self, slot: PeerSlot) -> None:
        """A peer never sends anything: readable means gone (EOF) or misbehaving. Its
        doorbells stay (not announced): the same peer may come back (module docstring)."""
        if slot.conn is None:
            return
        self.sel.unregister(slot.conn)
        slot.conn.close()
        slot.conn = None
        slot.detaches += 1
        slot.changed = time.time()
        log.info("%s: peer %d detached (its doorbells are kept for its return)", slot.role, slot.id)
        self.write_state()

    def write_state(self) -> None:
        if self.state is None:
            return
        data = {
            "pid": os.getpid(),
            "running": self.running,
            "files": [str(f) for f in self.files],
            "peers": {
                s.role: {
                    "id": s.id,
                    "socket": str(s.socket_path),
                    "attached": s.conn is not None,
                    "connections": s.connections,
                    "detaches": s.detaches,
                    "refused": s.refused,
                    "changed": s.changed,
                }
                for s in self.slots
            },
        }
        tmp = self.state.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.state)

    def run(self) -> None:
        """Serve until ``running`` is cleared (by a signal handler or another thread)."""
        while self.running:
            for key, _ in self.sel.select(0.5):
                what, slot = key.data
                if what == "accept":
                    self.accept(slot)
                elif key.fileobj is slot.conn:  # not one already replaced in this batch
                    self.hangup(slot)
        self.close()

    def close(self) -> None:
        self.running = False
        for slot in self.slots:
            self.hangup(slot)
            for fd in slot.eventfds:
                os.close(fd)
            slot.eventfds = []
            if slot.listener is not None:
                slot.listener.close()
                slot.listener = None
            slot.socket_path.unlink(missing_ok=True)
        if self.msg_fd >= 0:
            os.close(self.msg_fd)
            self.msg_fd = -1
        for f in self.files:
            f.unlink(missing_ok=True)
        self.sel.close()
        self.write_state()


def _peer(text: str) -> tuple[str, Path, int]:
    """``role=PATH:ID``"""
    role, _, rest = text.partition("=")
    path, _, pid = rest.rpartition(":")
    if not role or not path or not pid.isdigit():
        raise argparse.ArgumentTypeError(f"--peer {text!r}: expected ROLE=SOCKET:ID")
    return role, Path(path), int(pid)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgevirt.servicevm.hypervisor")
    ap.add_argument("--carveout", type=Path, required=True)
    ap.add_argument("--carveout-size", type=int, required=True)
    ap.add_argument("--msg", type=Path, required=True)
    ap.add_argument("--msg-size", type=int, required=True)
    ap.add_argument("--peer", type=_peer, action="append", required=True)
    ap.add_argument("--vectors", type=int, default=2)
    ap.add_argument("--state", type=Path, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        hv = Hypervisor(args.carveout, args.carveout_size, args.msg, args.msg_size, args.peer,
                        args.vectors, args.state)  # fmt: skip
    except (OSError, ValueError) as e:
        log.error("cannot start: %s", e)
        for f in (args.carveout, args.msg):
            f.unlink(missing_ok=True)
        return 1

    def stop(signum: int, _frame: object) -> None:
        hv.running = False

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    hv.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
