"""virtio-console (virtio spec 5.3) with ``MULTIPORT``: named ports, each a unix socket on
the back-end's side, every byte the guest writes kept in a log.

Queues: port 0 receiveq/transmitq (0, 1), the control receiveq/transmitq (2, 3), then port
*p* ≥ 1 at ``2(p+1)`` and ``2(p+1)+1``. Config: ``cols``, ``rows`` (0: ``SIZE`` is not
offered), ``max_nr_ports``, ``emerg_wr``.

Port handshake (5.3.6.2): the driver sends DEVICE_READY; the device announces each port
with DEVICE_ADD; for each PORT_READY it answers CONSOLE_PORT (for the port marked as the
console, which becomes ``/dev/hvcN``), PORT_NAME (``/sys/class/virtio-ports/*/name``) and
PORT_OPEN 1. The back-end is always the connected host side (it logs), so a guest writing
to a port with no client attached never blocks; a client connects to ``<dir>/<name>.sock``
(one at a time; a second is refused) and receives what the guest writes from then on, and
what it sends reaches the guest's port. A port named ``NAME@pty`` is a pseudo-terminal
instead (``<dir>/<name>.pty`` links to it; see :class:`PtyClient`). ``<dir>/<name>.log``
has all guest output.

Flow: guest output is written to the client without buffering in the back-end: a transmit
chain the socket cannot take yet is deferred (the device interface's deferred completion)
until the socket is writable, so a slow client slows the guest instead of growing memory.
Client input is read only into deferred receive chains, and only while the guest has the
port open (Linux drops what arrives on a closed port; so does nothing here).

Hostile driver rules: a control message shorter than its 8-byte header, for a port that
does not exist, or with an unknown event is dropped and counted; a transmit chain with
device-writable buffers or a receive chain with device-readable ones is answered empty and
counted. Neither the queue nor the process suffers.

QEMU 7.2 has no vhost-user console front-end (its ``virtio-serial`` is built in), so this
device is served over virtio-msg; over vhost-user it works with any front-end that forwards
config space (the synthetic one in the tests does).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
import tty
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from edgevirt.backend.devices.base import DEFERRED, Chain, VirtioDevice, gather, scatter, views
from edgevirt.backend.memory import GuestMemory
from edgevirt.errors import BackendError, ConfigError

log = logging.getLogger(__name__)

F_MULTIPORT = 1
CTRL_RX, CTRL_TX = 2, 3
#: struct virtio_console_control: id, event, value.
CONTROL = struct.Struct("<IHH")
DEVICE_READY, DEVICE_ADD, DEVICE_REMOVE, PORT_READY = 0, 1, 2, 3
CONSOLE_PORT, RESIZE, PORT_OPEN, PORT_NAME = 4, 5, 6, 7
EVENT_NAMES = {0: "device_ready", 1: "device_add", 2: "device_remove", 3: "port_ready",
               4: "console_port", 5: "resize", 6: "port_open", 7: "port_name"}  # fmt: skip
MAX_PORTS = 30
MAX_CONTROL = 256
MAX_TX = 64 * 1024  # bytes of one transmit chain taken at a time
NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,32}$")


class PtyClient:
    """A port's pseudo-terminal, shaped like the client socket of a socket port.

    The back-end holds the slave open (raw: no echo, no CR/LF mapping), so the master
    never reports a hang-up and anyone may open ``<dir>/<name>.pty`` to talk to the port.
    Output nobody reads fills the pty's small buffer and is then dropped and counted,
    as on a serial line nobody listens to (it is in the log either way).
    """

    def __init__(self, link: Path) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)
        self.link = link
        link.unlink(missing_ok=True)
        link.symlink_to(self.path)
        self.dropped = 0

    def fileno(self) -> int:
        return self.master

    def send(self, data: bytes) -> int:
        """Everything is taken: what the pty has no room for is dropped (and counted)."""
        try:
            n = os.write(self.master, data)
        except BlockingIOError:
            n = 0
        self.dropped += len(data) - n
        return len(data)

    def recvmsg_into(self, bufs: list[memoryview]) -> tuple[int, list, int, None]:
        return os.readv(self.master, bufs), [], 0, None

    def close(self) -> None:
        for fd in (self.master, self.slave):
            os.close(fd)
        self.link.unlink(missing_ok=True)


@dataclass(eq=False)
class Port:
    id: int
    name: str
    console: bool
    listener: socket.socket | None
    log: BinaryIO
    client: socket.socket | PtyClient | None = None
    rx: deque[Chain] = field(default_factory=deque)
    #: Transmit chains waiting for the client to take them: (chain, data, bytes sent).
    tx: deque[list] = field(default_factory=deque)
    guest_open: bool = False
    ready: bool = False

    @property
    def queues(self) -> tuple[int, int]:
        base = 0 if self.id == 0 else 2 * (self.id + 1)
        return base, base + 1


class ConsoleDevice(VirtioDevice):
    name = "console"
    device_id = 3

    def __init__(
        self,
        names: list[str],
        directory: str | os.PathLike[str],
        console: str | None = None,
        ptys: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__()
        if not 1 <= len(names) <= MAX_PORTS:
            raise ConfigError(f"console: {len(names)} ports, expected 1..{MAX_PORTS}")
        for n in names:
            if not NAME_RE.match(n):
                raise ConfigError(f"console: port name {n!r}: expected 1-32 of [A-Za-z0-9._-]")
        if len(set(names)) != len(names):
            raise ConfigError(f"console: port names {names} repeat")
        if console is not None and console not in names:
            raise ConfigError(f"console: console={console!r} is not one of the ports {names}")
        if not ptys <= set(names):
            raise ConfigError(f"console: pty ports {sorted(ptys)} are not all among {names}")
        self.dir = Path(directory)
        try:  # a service VM's /run starts empty: make the directory
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"console: dir={self.dir}: {e.strerror}") from e
        self.features = 1 << F_MULTIPORT
        self.num_queues = 2 * (len(names) + 1)
        self.ports: list[Port] = []
        self.by_queue: dict[int, tuple[Port, bool]] = {}
        self.ctrl_rx: deque[Chain] = deque()
        self.control: deque[bytes] = deque()
        try:
            for i, n in enumerate(names):
                logf = open(self.dir / f"{n}.log", "ab")  # noqa: SIM115 - closed in close()
                if n in ptys:
                    port = Port(i, n, n == console, None, logf)
                    port.client = PtyClient(self.dir / f"{n}.pty")
                    self.ports.append(port)
                    rxq, txq = port.queues
                    self.by_queue[rxq] = (port, True)
                    self.by_queue[txq] = (port, False)
                    continue
                path = self.dir / f"{n}.sock"
                path.unlink(missing_ok=True)
                lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    lsock.bind(str(path))
                    lsock.listen(1)
                except OSError as e:
                    lsock.close()
                    logf.close()
                    raise BackendError(f"console: cannot listen on {path}: {e.strerror}") from e
                lsock.setblocking(False)
                port = Port(i, n, n == console, lsock, logf)
                self.ports.append(port)
                rxq, txq = port.queues
                self.by_queue[rxq] = (port, True)
                self.by_queue[txq] = (port, False)
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_ports(cls, spec: str, directory: str) -> ConsoleDevice:
        """``ports=a+b+c`` (``--device``): ``NAME[@pty][!]``; ``@pty`` gives the port a
        pseudo-terminal instead of a socket, ``!`` makes it the console port."""
        names, console, ptys = [], None, set()
        for item in filter(None, spec.split("+")):
            is_console = "!" in item
            is_pty = "@pty" in item
            item = item.replace("!", "").replace("@pty", "")
            if is_console:
                console = item
            if is_pty:
                ptys.add(item)
            names.append(item)
        return cls(names, directory, console, frozenset(ptys))

    def attach(self, host) -> None:  # type: ignore[no-untyped-def]
        super().attach(host)
        for port in self.ports:
            if port.listener is not None:
                host.add_reader(port.listener.fileno(), lambda p=port: self._accept(p))

    def config(self) -> bytes:
        return struct.pack("<HHII", 0, 0, len(self.ports), 0)

    def snapshot(self) -> dict:
        return {
            "ports": [
                {
                    "name": p.name,
                    "id": p.id,
                    "client": p.client is not None,
                    "guest_open": p.guest_open,
                    "ready": p.ready,
                    **(
                        {"pty": p.client.path, "pty_dropped": p.client.dropped}
                        if isinstance(p.client, PtyClient)
                        else {}
                    ),
                }
                for p in self.ports
            ]
        }

    # -- lifetime -------------------------------------------------------------------------

    def queue_stopped(self, queue: int) -> None:
        if queue == CTRL_RX:
            self.ctrl_rx.clear()
            return
        entry = self.by_queue.get(queue)
        if entry is None:
            return
        port, is_rx = entry
        if is_rx:
            port.rx.clear()
        else:
            port.tx.clear()
            if port.client is not None and self.host is not None:
                self.host.remove_writer(port.client.fileno())

    def reset(self) -> None:
        super().reset()
        self.control.clear()
        for p in self.ports:
            p.guest_open = p.ready = False

    def close(self) -> None:
        for p in self.ports:
            if self.host is not None and p.listener is not None:
                self.host.remove_reader(p.listener.fileno())
            self._drop_client(p, "closing")
            if p.listener is not None:
                p.listener.close()
                (self.dir / f"{p.name}.sock").unlink(missing_ok=True)
            p.log.close()
        self.ports = []

    def _drop(self, why: str) -> None:
        self.stats.errors += 1
        self.stats.count(why)

    # -- host side ------------------------------------------------------------------------

    def _accept(self, port: Port) -> None:
        assert port.listener is not None
        try:
            sock, _ = port.listener.accept()
        except OSError:
            return
        if port.client is not None:
            sock.close()  # one client per port
            self.stats.count("client_refused")
            return
        sock.setblocking(False)
        port.client = sock
        log.info("console: client connected to port %s", port.name)
        self._watch_client(port)

    def _watch_client(self, port: Port) -> None:
        """Read the client only into waiting buffers of a port the guest has open: Linux
        discards what arrives on a closed port (as QEMU's virtio-serial, we hold it back)."""
        if port.client is None or self.host is None:
            return
        if port.rx and port.guest_open:
            self.host.add_reader(port.client.fileno(), lambda: self._client_readable(port))
        else:
            self.host.remove_reader(port.client.fileno())

    def _drop_client(self, port: Port, why: str) -> None:
        if port.client is None:
            return
        if self.host is not None:
            self.host.remove_reader(port.client.fileno())
            self.host.remove_writer(port.client.fileno())
        port.client.close()
        port.client = None
        log.info("console: port %s client gone: %s", port.name, why)
        self._complete_tx(port)  # what was waiting for that client is done (logged)

    def _client_readable(self, port: Port) -> None:
        host = self.host
        if host is None or port.client is None:
            return
        done: list[tuple[Chain, int]] = []
        while port.rx and port.client is not None:
            chain = port.rx[0]
            try:
                n = port.client.recvmsg_into(views(host.mem, chain.writable))[0]
            except BlockingIOError:
                break
            except OSError as e:
                self._drop_client(port, e.strerror or str(e))
                break
            if n == 0:
                if isinstance(port.client, PtyClient):
                    break
                self._drop_client(port, "hung up")
                break
            port.rx.popleft()
            done.append((chain, n))
            self.stats.bytes_written += n
        self._watch_client(port)
        if done:
            host.complete(port.queues[0], done)

    def _client_writable(self, port: Port) -> None:
        self._complete_tx(port)

    def _complete_tx(self, port: Port) -> None:
        """Write waiting guest output to the client; complete the chains it took."""
        host = self.host
        if host is None:
            return
        done: list[tuple[Chain, int]] = []
        while port.tx:
            item = port.tx[0]
            chain, data, sent = item
            if port.client is not None:
                try:
                    sent += port.client.send(data[sent:])
                except BlockingIOError:
                    pass
                except OSError as e:
                    self._drop_client(port, e.strerror or str(e))
                    return  # _drop_client completed the rest
                item[2] = sent
                if sent < len(data):
                    host.add_writer(port.client.fileno(), lambda: self._client_writable(port))
                    break
            port.tx.popleft()
            done.append((chain, 0))
        else:
            if port.client is not None:
                host.remove_writer(port.client.fileno())
        if done:
            host.complete(port.queues[1], done)

    # -- chains ---------------------------------------------------------------------------

    def handle(self, queue: int, chain: Chain, mem: GuestMemory) -> int:
        if queue == CTRL_RX:
            if chain.readable or chain.writable_len < CONTROL.size:
                self._drop("ctrl_rx_bad_chain")
                return 0
            self.ctrl_rx.append(chain)
            self._pump_control()
            return DEFERRED
        if queue == CTRL_TX:
            self._control_in(chain, mem)
            self._pump_control()
            return 0
        entry = self.by_queue.get(queue)
        if entry is None:
            raise BackendError(f"console: chain {chain.head} on queue {queue}, device has "
                               f"{self.num_queues}")  # fmt: skip
        port, is_rx = entry
        if is_rx:
            if chain.readable or not chain.writable:
                self._drop("rx_bad_chain")
                return 0
            port.rx.append(chain)
            self._watch_client(port)
            return DEFERRED
        if chain.writable or not chain.readable:
            self._drop("tx_bad_chain")
            return 0
        data = gather(mem, chain.readable, min(chain.readable_len, MAX_TX))
        self.stats.requests += 1
        self.stats.bytes_read += len(data)
        port.log.write(data)
        port.log.flush()
        if port.client is None and not port.tx:
            return 0
        port.tx.append([chain, data, 0])
        self._complete_tx(port)
        return DEFERRED

    def _control_in(self, chain: Chain, mem: GuestMemory) -> None:
        if chain.writable or chain.readable_len < CONTROL.size:
            log.warning("console: control chain %d: %d readable / %d writable bytes, expected "
                        "a read-only %d-byte message", chain.head, chain.readable_len,
                        chain.writable_len, CONTROL.size)  # fmt: skip
            self._drop("ctrl_bad_chain")
            return
        pid, event, value = CONTROL.unpack(gather(mem, chain.readable, CONTROL.size))
        self.stats.count(f"ctrl_{EVENT_NAMES.get(event, 'unknown')}")
        if event == DEVICE_READY:
            if value != 1:
                log.error("console: the driver failed to set up the device (DEVICE_READY 0)")
                return
            for p in self.ports:
                self._send(p.id, DEVICE_ADD, 1)
            return
        if event not in (PORT_READY, PORT_OPEN):
            log.warning("console: control event %d for port %d is not one a driver sends",
                        event, pid)  # fmt: skip
            self._drop("ctrl_bad_event")
            return
        if pid >= len(self.ports):
            log.warning("console: control event %s for port %d, device has %d ports",
                        EVENT_NAMES[event], pid, len(self.ports))  # fmt: skip
            self._drop("ctrl_bad_port")
            return
        port = self.ports[pid]
        if event == PORT_READY:
            if value != 1:
                log.error("console: the driver failed to add port %d (%s)", pid, port.name)
                return
            port.ready = True
            if port.console:
                self._send(pid, CONSOLE_PORT, 1)
            self._send(pid, PORT_NAME, 1, port.name.encode())
            self._send(pid, PORT_OPEN, 1)
        else:
            port.guest_open = bool(value)
            log.info("console: guest %s port %s", "opened" if value else "closed", port.name)
            self._watch_client(port)

    def _send(self, pid: int, event: int, value: int, extra: bytes = b"") -> None:
        if len(self.control) >= MAX_CONTROL:
            self._drop("ctrl_dropped")
            return
        self.control.append(CONTROL.pack(pid, event, value) + extra)

    def _pump_control(self) -> None:
        host = self.host
        if host is None:
            return
        done: list[tuple[Chain, int]] = []
        while self.ctrl_rx and self.control:
            chain = self.ctrl_rx.popleft()
            msg = self.control.popleft()
            bufs = views(host.mem, chain.writable)
            room = sum(len(b) for b in bufs)
            msg = msg[:room]  # a name longer than the buffer is cut (the driver's problem)
            done.append((chain, scatter(bufs, msg)))
        if done:
            host.complete(CTRL_RX, done)
