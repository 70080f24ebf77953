"""A simulated GPIO bank for virtio-gpio on a host without real lines.

Each line has the level the outside world drives on it (``set``) and, when the guest makes
it an output, the value the guest drives (``get`` reads what is on the wire: the guest's
value for an output, the outside level otherwise). The outside is a test or
``edgevirt backend gpio get|set|list``, talking to the running back-end over a unix socket
(the device's ``ctl=`` option) with one JSON object per line::

    → {"op": "set", "line": "button", "value": 1}     line: a name or a number
    ← {"ok": true, "line": 1, "name": "button", "value": 1, "direction": "in"}
    → {"op": "get", "line": 0}
    → {"op": "list"}
    ← {"ok": true, "lines": [{"line": 0, "name": "led", "value": 0, "direction": "out"}, …]}
    ← {"ok": false, "error": "line 'x': no such line (led, button)"}

Setting a line the guest drives as an output is refused (two drivers on one wire).
Clients are bounded (:data:`MAX_CLIENTS`, requests of at most 4 KiB).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from edgevirt.backend.devices.base import DeviceHost
from edgevirt.backend.devices.gpio import DIR_NONE, DIR_OUT, DIRECTIONS, GpioError
from edgevirt.errors import BackendError

log = logging.getLogger(__name__)

MAX_CLIENTS = 16
MAX_REQUEST = 4096


class SimBank:
    def __init__(self, names: Sequence[str], ctl: str | os.PathLike[str] | None = None) -> None:
        self.names = list(names)
        n = len(self.names)
        self.direction = [DIR_NONE] * n
        self.driven = [0] * n  # the guest's output value
        self.level = [0] * n  # the outside's level
        self.changed: Callable[[int, int, int], None] | None = None
        self.host: DeviceHost | None = None
        self.ctl = Path(ctl) if ctl is not None else None
        self.listener: socket.socket | None = None
        self.clients: dict[int, tuple[socket.socket, bytearray]] = {}
        if self.ctl is not None:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.ctl.parent.mkdir(parents=True, exist_ok=True)
                self.ctl.unlink(missing_ok=True)
                self.listener.bind(str(self.ctl))
                self.listener.listen(4)
            except OSError as e:
                self.listener.close()
                raise BackendError(f"gpio: cannot listen on ctl={self.ctl}: {e.strerror}") from e
            self.listener.setblocking(False)

    # -- GpioBank -------------------------------------------------------------------------

    def attach(self, host: DeviceHost, changed: Callable[[int, int, int], None]) -> None:
        self.host, self.changed = host, changed
        if self.listener is not None:
            host.add_reader(self.listener.fileno(), self._accept)

    def set_direction(self, line: int, direction: int, value: int) -> None:
        self.direction[line] = direction
        self.driven[line] = value

    def set_value(self, line: int, value: int) -> None:
        self.driven[line] = value

    def get_value(self, line: int) -> int:
        return self.wire(line)

    def close(self) -> None:
        for sock, _ in self.clients.values():
            sock.close()
        self.clients.clear()
        if self.listener is not None:
            if self.host is not None:
                self.host.remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None
            if self.ctl is not None:
                self.ctl.unlink(missing_ok=True)

    def describe(self) -> str:
        return f"simulated, ctl {self.ctl}" if self.ctl else "simulated"

    # -- the outside world ----------------------------------------------------------------

    def wire(self, line: int) -> int:
        return self.driven[line] if self.direction[line] == DIR_OUT else self.level[line]

    def lookup(self, ref: object) -> int:
        if isinstance(ref, int) and not isinstance(ref, bool) and 0 <= ref < len(self.names):
            return ref
        if isinstance(ref, str):
            if ref in self.names:
                return self.names.index(ref)
            if ref.isdigit() and int(ref) < len(self.names):
                return int(ref)
        raise GpioError(f"line {ref!r}: no such line ({', '.join(self.names)})")

    def drive(self, line: int, level: int) -> None:
        """The outside sets ``line`` to ``level`` (an edge reaches the guest if it waits)."""
        if level not in (0, 1):
            raise GpioError(f"value {level!r}: expected 0 or 1")
        if self.direction[line] == DIR_OUT:
            raise GpioError(f"line {line} ({self.names[line]}) is an output the guest drives")
        if self.level[line] != level:
            self.level[line] = level
            if self.changed is not None:
                self.changed(line, level, time.monotonic_ns())

    def line_state(self, line: int) -> dict:
        return {"line": line, "name": self.names[line], "value": self.wire(line),
                "direction": DIRECTIONS[self.direction[line]]}  # fmt: skip

    def request(self, req: object) -> dict:
        """One control request → its reply (never raises)."""
        try:
            if not isinstance(req, dict):
                raise GpioError("expected a JSON object")
            op = req.get("op")
            if op == "list":
                return {"ok": True, "lines": [self.line_state(i) for i in range(len(self.names))]}
            if op not in ("get", "set"):
                raise GpioError(f"op {op!r}: expected get, set or list")
            line = self.lookup(req.get("line"))
            if op == "set":
                self.drive(line, req.get("value"))  # type: ignore[arg-type]
            return {"ok": True, **self.line_state(line)}
        except GpioError as e:
            return {"ok": False, "error": str(e)}

    def _accept(self) -> None:
        assert self.listener is not None and self.host is not None
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        if len(self.clients) >= MAX_CLIENTS:
            sock.close()
            return
        sock.setblocking(False)
        fd = sock.fileno()
        self.clients[fd] = (sock, bytearray())
        self.host.add_reader(fd, lambda: self._readable(fd))

    def _readable(self, fd: int) -> None:
        sock, buf = self.clients[fd]
        try:
            data = sock.recv(MAX_REQUEST)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        buf += data
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            try:
                reply = self.request(json.loads(line))
            except (ValueError, UnicodeDecodeError) as e:
                reply = {"ok": False, "error": f"not JSON: {e}"}
            try:
                sock.sendall(json.dumps(reply).encode() + b"\n")  # short replies
            except OSError:
                data = b""
                break
        if not data or len(buf) > MAX_REQUEST:
            assert self.host is not None
            self.host.remove_reader(fd)
            sock.close()
            del self.clients[fd]


def control(ctl: str | os.PathLike[str], request: dict, timeout: float = 5.0) -> dict:
    """Send one request to a running simulated bank's control socket; return the reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(ctl))
            s.sendall(json.dumps(request).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except OSError as e:
            raise BackendError(f"gpio control socket {ctl}: {e.strerror or e}") from e
    try:
        reply = json.loads(buf)
    except ValueError:
        raise BackendError(f"gpio control socket {ctl}: bad reply {buf[:80]!r}") from None
    if not isinstance(reply, dict):
        raise BackendError(f"gpio control socket {ctl}: bad reply {buf[:80]!r}")
    return reply
