"""``unix:///path/to/socket``: a serial console on a unix stream socket (QEMU's chardev).

pyserial finds this module through ``serial.protocol_handler_packages``; it reuses the
``socket://`` handler's reading and writing and only changes how the socket is opened.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
import urllib.parse

from serial.serialutil import SerialException
from serial.urlhandler import protocol_socket


class Serial(protocol_socket.Serial):
    def open(self) -> None:
        self.logger = None
        if self._port is None:
            raise SerialException("Port must be configured before it can be used.")
        if self.is_open:  # type: ignore[has-type]
            raise SerialException("Port is already open.")
        path = self.from_url(self.portstr)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(protocol_socket.POLL_TIMEOUT)
            sock.connect(path)
        except OSError as e:
            sock.close()
            raise SerialException(f"could not open {self.portstr}: {e}") from e
        sock.setblocking(False)
        self._socket = sock
        # No reset_input_buffer(): whatever the target sent on connect is console output.
        self.is_open = True

    def from_url(self, url: str) -> str:  # type: ignore[override]
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "unix" or not parts.path:
            raise SerialException(f"expected unix:///path/to/socket, got {url!r}")
        return parts.path

    @property
    def in_waiting(self) -> int:
        """Bytes readable now (the socket handler's own answer is only 0 or 1)."""
        if not self.is_open:
            raise SerialException("port not open")
        buf = fcntl.ioctl(self._socket.fileno(), termios.FIONREAD, b"\0\0\0\0")
        return int(struct.unpack("i", buf)[0])

    def close(self) -> None:
        if self.is_open and self._socket is not None:
            try:
                self._socket.close()
            except OSError:
                pass
            self._socket = None  # type: ignore[assignment]
        self.is_open = False
