"""A minimal QMP client (QEMU Machine Protocol): greeting, capabilities, commands.

QMP is line-delimited JSON on a unix socket. Asynchronous events may arrive between a
command and its reply; they are collected in :attr:`Qmp.events`, not mistaken for replies.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from edgevirt.errors import DeployError


class Qmp:
    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._buf = b""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._sock.connect(str(path))
                break
            except OSError as e:
                if time.monotonic() >= deadline:
                    self._sock.close()
                    raise DeployError(f"QMP: cannot connect to {path}: {e}") from e
                time.sleep(0.05)
        greeting = self._recv()
        if "QMP" not in greeting:
            self.close()
            raise DeployError(f"QMP: unexpected greeting {greeting!r}")
        self.execute("qmp_capabilities")

    def _recv(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            try:
                chunk = self._sock.recv(65536)
            except OSError as e:
                raise DeployError(f"QMP: {self.path}: {e}") from e
            if not chunk:
                raise DeployError(f"QMP: {self.path}: QEMU closed the connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            msg: dict[str, Any] = json.loads(line)
        except ValueError as e:
            raise DeployError(f"QMP: malformed message {line[:200]!r}") from e
        return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            raise DeployError(f"QMP: {command}: {e}") from e
        while True:
            reply = self._recv()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                err = reply["error"]
                raise DeployError(f"QMP {command}: {err.get('class')}: {err.get('desc')}")
            return reply.get("return")

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass
