"""Fakes for console tests that users can build on too.

:class:`PtyShellPort` runs a real shell on a pseudo-terminal and exposes the terminal side
with the subset of pyserial's API the expect engine uses (``read``, ``write``, ``flush``,
``close``), so framing is tested against real echo, prompts and line discipline.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import termios

import serial


class PtyShellPort:
    def __init__(
        self,
        argv: list[str] | None = None,
        *,
        timeout: float = 0.1,
        env: dict[str, str] | None = None,
    ) -> None:
        self.timeout = timeout
        master, slave = pty.openpty()
        self.fd = master
        self.proc = subprocess.Popen(
            argv or ["/bin/sh", "-i"],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            env={"PS1": "fake# ", "PATH": os.environ["PATH"], **(env or {})},
        )
        os.close(slave)
        self.is_open = True

    def read(self, size: int = 1) -> bytes:
        if not self.is_open:
            raise serial.SerialException("port closed")
        ready, _, _ = select.select([self.fd], [], [], self.timeout)
        if not ready:
            return b""
        try:
            data = os.read(self.fd, size)
        except OSError as e:  # EIO once the shell side is gone: a disconnected console
            raise serial.SerialException(f"pty read failed: {e}") from e
        if not data:
            raise serial.SerialException("pty closed")
        return data

    @property
    def in_waiting(self) -> int:
        if not self.is_open:
            raise serial.SerialException("port closed")
        try:
            buf = fcntl.ioctl(self.fd, termios.FIONREAD, b"\0\0\0\0")
        except OSError as e:
            raise serial.SerialException(f"pty gone: {e}") from e
        return int(struct.unpack("i", buf)[0])

    def write(self, data: bytes) -> int:
        if not self.is_open:
            raise serial.SerialException("port closed")
        view = memoryview(data)
        while view:
            _, ready, _ = select.select([], [self.fd], [], 5.0)
            if not ready:
                raise serial.SerialException("pty write timed out")
            n = os.write(self.fd, view)
            view = view[n:]
        return len(data)

    def flush(self) -> None:
        pass

    def kill(self) -> None:
        """Simulate the target vanishing (board power loss, ser2net dropping us)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # the shell already exited and is only waiting to be reaped
            self.proc.wait()

    def close(self) -> None:
        if self.is_open:
            self.kill()
            os.close(self.fd)
            self.is_open = False


class ScriptedPort:
    """A port that hands out pre-recorded output, one chunk per read burst (a boot log
    replayed at full speed); what is written to it is kept in ``written``."""

    def __init__(self, chunks: list[bytes], *, timeout: float = 0.01) -> None:
        self._chunks = [c for c in chunks if c]
        self._current = b""
        self.timeout = timeout
        self.written = bytearray()
        self.reads = 0  # bursts handed out
        self.is_open = True

    def read(self, size: int = 1) -> bytes:
        if not self.is_open:
            raise serial.SerialException("port closed")
        if not self._current:
            if not self._chunks:
                return b""
            self._current = self._chunks.pop(0)
            self.reads += 1
        data, self._current = self._current[:size], self._current[size:]
        return data

    @property
    def in_waiting(self) -> int:
        return len(self._current)

    def write(self, data: bytes) -> int:
        self.written += data
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.is_open = False
