"""A fake fastboot device on TCP, for tests and for trying the fastboot chain without a board.

It speaks the protocol of AOSP's ``fastboot/README.md`` as a bootloader would: the TCP
transport (handshake ``FB01``, then packets framed by an 8-byte big-endian length), commands
``getvar:<name>``, ``download:<8 hex digits>`` (answered ``DATA<size>``, then the data, then
``OKAY``), ``boot``, ``flash:<partition>``, ``erase:<partition>``, ``reboot``,
``reboot-bootloader`` and ``continue``; answers are ``OKAY``, ``FAIL<reason>`` or ``INFO``.
``boot`` and ``flash:boot`` check the downloaded Android boot image (header, sizes, an arm64
kernel, a DTB) and refuse a bad one with ``FAIL``, as ABL does.

Behaviours a real device shows on a bad day, chosen with ``mode``:

* ``ok``: all of the above;
* ``fail``: every command after the handshake answers ``FAIL<fail_message>``;
* ``silent``: the handshake completes, then the device reads commands and never answers
  (a hung bootloader): the client must time out, not hang.

What the device received is kept in :attr:`FakeFastbootDevice.booted` / ``flashed`` and, for
a device in another process, written as JSON to ``state_file``.

``python -m edgevirt.deploy.fastboot_device --port 5554 [--mode fail] [--state S.json]``
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import struct
import threading
from pathlib import Path
from typing import Any

from edgevirt.errors import ImageError
from edgevirt.image.bootimg import FDT_MAGIC, kernel_kind, parse_bootimg

log = logging.getLogger(__name__)

HANDSHAKE = b"FB01"
MAX_DOWNLOAD = 512 << 20
MODES = ("ok", "fail", "silent")
VARIABLES = {
    "version": "0.4",
    "product": "sa8155p-adp",
    "serialno": "edgevirt-fake",
    "secure": "no",
    "unlocked": "yes",
    "is-userspace": "no",
    "max-download-size": f"{MAX_DOWNLOAD:#x}",
    "current-slot": "a",
    "slot-count": "2",
}
PARTITIONS = {"boot_a", "boot_b", "dtbo_a", "dtbo_b", "vbmeta_a", "vbmeta_b"}


class _Closed(Exception):
    pass


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise _Closed
        buf += chunk
    return bytes(buf)


def _recv_packet(conn: socket.socket) -> bytes:
    (size,) = struct.unpack(">Q", _recv_exact(conn, 8))
    if size > MAX_DOWNLOAD:
        raise _Closed
    return _recv_exact(conn, size)


def _send_packet(conn: socket.socket, data: bytes) -> None:
    conn.sendall(struct.pack(">Q", len(data)) + data)


class FakeFastbootDevice:
    """A fastboot device on ``127.0.0.1:port`` (0: any free port), served in a thread."""

    def __init__(
        self,
        port: int = 0,
        *,
        mode: str = "ok",
        fail_message: str = "command refused by the fake device",
        state_file: Path | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: expected one of {MODES}")
        self.mode = mode
        self.fail_message = fail_message
        self.state_file = state_file
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.download: bytes = b""
        self.commands: list[str] = []
        self.booted: dict[str, Any] | None = None
        self.flashed: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def serial(self) -> str:
        """What ``fastboot -s`` takes to reach this device."""
        return f"tcp:127.0.0.1:{self.port}"

    # -- lifetime -------------------------------------------------------------------------

    def start(self) -> FakeFastbootDevice:
        self._thread = threading.Thread(target=self.serve, name="fake-fastboot", daemon=True)
        self._thread.start()
        return self

    def serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(None)
                try:
                    self._session(conn)
                except (_Closed, ConnectionError, OSError):
                    pass

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> FakeFastbootDevice:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- protocol -------------------------------------------------------------------------

    def _session(self, conn: socket.socket) -> None:
        hello = _recv_exact(conn, 4)
        if hello[:2] != b"FB" or not hello[2:].isdigit():
            return  # malformed handshake: disconnect, as the protocol says
        conn.sendall(HANDSHAKE)
        while not self._stop.is_set():
            cmd = _recv_packet(conn).decode("ascii", "replace")
            self.commands.append(cmd)
            log.info("fake fastboot: %s", cmd)
            if self.mode == "silent":
                continue
            if self.mode == "fail":
                _send_packet(conn, b"FAIL" + self.fail_message.encode()[:252])
                continue
            reply = self._command(conn, cmd)
            _send_packet(conn, reply)
            if cmd in ("boot", "reboot", "reboot-bootloader", "continue") and reply[:4] == b"OKAY":
                self._save()
                return  # the device leaves fastboot: the connection ends

    def _command(self, conn: socket.socket, cmd: str) -> bytes:
        name, _, arg = cmd.partition(":")
        if name == "getvar":
            if arg == "all":
                for k, v in VARIABLES.items():
                    _send_packet(conn, f"INFO{k}: {v}".encode())
                return b"OKAY"
            value = VARIABLES.get(arg)
            if value is None and arg.startswith("partition-type:"):
                value = "raw" if arg.split(":", 1)[1] in PARTITIONS | {"boot"} else None
            return b"OKAY" + value.encode() if value is not None else b"FAILUnknown variable"
        if name == "download":
            try:
                size = int(arg, 16)
            except ValueError:
                return f"FAILdownload: {arg!r} is not a hex size".encode()
            if len(arg) != 8 or not 0 < size <= MAX_DOWNLOAD:
                return f"FAILdownload: size {arg!r} (max {MAX_DOWNLOAD:#010x})".encode()
            _send_packet(conn, f"DATA{size:08x}".encode())
            buf = bytearray()
            while len(buf) < size:
                buf += _recv_packet(conn)
            if len(buf) != size:
                return f"FAILdownload: got {len(buf)} bytes, announced {size}".encode()
            self.download = bytes(buf)
            return b"OKAY"
        if name == "boot":
            return self._check_boot("boot")
        if name == "flash":
            part = arg if arg in PARTITIONS else f"{arg}_a" if f"{arg}_a" in PARTITIONS else None
            if part is None:
                return f"FAILflash: no partition {arg!r}".encode()
            if not self.download:
                return b"FAILflash: nothing downloaded"
            if part.startswith("boot"):
                r = self._check_boot(f"flash:{arg}")
                if r[:4] != b"OKAY":
                    return r
            self.flashed[part] = len(self.download)
            self._save()
            return b"OKAY"
        if name == "erase":
            self.flashed.pop(arg, None)
            return b"OKAY"
        if name in ("reboot", "reboot-bootloader", "continue"):
            return b"OKAY"
        return f"FAILunknown command {name!r}".encode()

    def _check_boot(self, what: str) -> bytes:
        if not self.download:
            return f"FAIL{what}: nothing downloaded".encode()
        try:
            img = parse_bootimg(self.download, "downloaded image")
        except ImageError as e:
            return f"FAIL{what}: {e}".encode()[:256]
        if kernel_kind(img.kernel) == "unknown":
            return f"FAIL{what}: kernel is neither an arm64 Image nor gzip".encode()
        if img.header_version >= 2 and img.dtb[:4] != FDT_MAGIC:
            return f"FAIL{what}: the DTB section is not a flattened device tree".encode()
        if what == "boot":
            self.booted = img.summary()
        return b"OKAY"

    def _save(self) -> None:
        if self.state_file is not None:
            state = {"booted": self.booted, "flashed": self.flashed, "commands": self.commands}
            self.state_file.write_text(json.dumps(state, indent=2))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m edgevirt.deploy.fastboot_device")
    p.add_argument("--port", type=int, default=5554)
    p.add_argument("--mode", choices=MODES, default="ok")
    p.add_argument("--state", type=Path, default=None, help="JSON file of what was received")
    a = p.parse_args(argv)
    dev = FakeFastbootDevice(a.port, mode=a.mode, state_file=a.state)
    print(f"fake fastboot device on {dev.serial} ({a.mode})", flush=True)
    try:
        dev.serve()
    except KeyboardInterrupt:
        pass
    finally:
        dev.stop()


if __name__ == "__main__":
    main()
