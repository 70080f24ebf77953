"""Xen's one UART as one virtual console per domain.

Without dom0, Xen prints every dom0less domU's vpl011 output on its own UART, a line at a
time, as ``(XEN) DOM<n>: text``; its own lines start ``(XEN) `` too. Input goes to one
domain at a time: Ctrl-A pressed three times moves it on (Xen, DOM1, DOM2, …) and Xen
confirms with ``(XEN) *** Serial input to DOM<n>`` (or ``to Xen``). The cycle is Xen, DOM0,
DOM1, DOM2 …, DOM0 included even without a dom0 (its input is dropped).

:class:`XenConsoleMux` reads the UART, keeps the raw transcript, and hands each domain's
lines to a :class:`DomainPort`, which has the subset of pyserial's API the expect engine
uses (``read``, ``in_waiting``, ``write``, ``flush``, ``close``). A write to a domain's port
first moves the input focus there and waits for Xen's confirmation, so the same
marker-framed :class:`~edgevirt.console.expect.Console` drives every domain.

The domain that has the input is printed differently: character by character, each line
prefixed ``(XEN) `` only; those lines go to it unless they look like Xen's own (``***``,
``d1v0:`` …).

Xen's in-hypervisor vpl011 buffer holds 126 characters: a longer line arrives as several
``DOM<n>:`` lines of 126 characters, which are joined back here.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import serial

from edgevirt.console.expect import CommandResult, Console
from edgevirt.errors import ConsoleError, ConsoleTimeout

CTRL_A = b"\x01"
#: Xen 4.17's vpl011 output buffer (SBSA_UART_OUT_BUF_SIZE) less newline and NUL: longer
#: lines come in pieces of this many characters.
XEN_VPL011_CHUNK = 126
INPUT_CHUNK = 8
INPUT_PAUSE = 0.05
#: Focus value for Xen itself.
XEN = -1
#: Xen's own lines, told apart from the focused domain's unprefixed output.
_XEN_OWN = re.compile(rb"^(\*\*\* |d\d+v\d+[: ]|\(XEN\)|Xen |'|\[)")
_DOM = re.compile(rb"^\(XEN\) DOM(\d+): ?(.*)$")
_FOCUS = re.compile(rb"\*\*\* Serial input to (DOM(\d+)|Xen)")


class XenConsoleMux:
    def __init__(self, port: serial.SerialBase, raw_log: Path | None = None) -> None:
        self.port = port
        self._raw: IO[bytes] | None = open(raw_log, "ab") if raw_log else None  # noqa: SIM115
        self._partial = b""
        #: Everything read, for what runs before Xen (a bootloader's prompt has no newline).
        self.raw = bytearray()
        self._pending: dict[int, bytes] = {}  # a split line waiting for its continuation
        self.domains: dict[int, bytearray] = {}
        self.xen_lines: list[str] = []
        self.pause = INPUT_PAUSE
        #: Domain id that has the input (:data:`XEN` = Xen itself); None until Xen said so.
        self.focus: int | None = None
        self._focus_seen = 0

    @classmethod
    def open(cls, url: str, raw_log: Path | None = None, timeout: float = 10.0) -> XenConsoleMux:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return cls(serial.serial_for_url(url, timeout=0.05), raw_log)
            except (serial.SerialException, OSError) as e:
                if time.monotonic() >= deadline:
                    raise ConsoleError(f"Xen console: cannot open {url}: {e}") from e
                time.sleep(0.1)

    def port_for(self, domid: int) -> DomainPort:
        self.domains.setdefault(domid, bytearray())
        return DomainPort(self, domid)

    # -- reading --------------------------------------------------------------------------

    def pump(self, timeout: float = 0.05) -> None:
        """Read what the UART has (waiting up to ``timeout`` for the first byte)."""
        self.port.timeout = timeout
        try:
            data = self.port.read(1)
            if data and self.port.in_waiting:
                data += self.port.read(self.port.in_waiting)
        except (serial.SerialException, OSError) as e:
            raise ConsoleError(f"Xen console: disconnected ({e})") from e
        if not data:
            return
        if self._raw is not None:
            self._raw.write(data)
            self._raw.flush()
        self.raw += data
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self._line(line)

    def _line(self, raw: bytes) -> None:
        line = raw.rstrip(b"\r")
        m = _DOM.match(line)
        if m is None:
            f = _FOCUS.search(line)
            if f is not None:
                self.focus = int(f.group(2)) if f.group(2) else XEN
                self._focus_seen += 1
            body = line[6:] if line.startswith(b"(XEN) ") else line
            if self.focus is not None and self.focus > 0 and not _XEN_OWN.match(body):
                # The domain with the input is printed character by character, unprefixed.
                self.domains.setdefault(self.focus, bytearray()).extend(body + b"\n")
            else:
                self.xen_lines.append(line.decode("utf-8", "replace"))
            return
        domid, chunk = int(m.group(1)), self._pending.pop(int(m.group(1)), b"") + m.group(2)
        # A guest line ends "\r\n" and Xen adds its own "\r": a piece that Xen cut because
        # its buffer was full has one "\r" only, and the line goes on.
        if len(m.group(2)) >= XEN_VPL011_CHUNK and not raw.endswith(b"\r\r"):
            self._pending[domid] = chunk
            return
        self.domains.setdefault(domid, bytearray()).extend(chunk + b"\n")

    def expect_raw(self, pattern: bytes, timeout: float, start: int = 0,
                   abort: Callable[[], None] | None = None) -> int:  # fmt: skip
        """Wait for ``pattern`` (a regex) in the raw stream after ``start``; return its end
        (the bootloader before Xen, whose prompt has no newline)."""
        deadline = time.monotonic() + timeout
        pat = re.compile(pattern)
        while True:
            m = pat.search(self.raw, start)
            if m:
                return m.end()
            if time.monotonic() >= deadline:
                tail = self.raw[-400:].decode("utf-8", "replace")
                raise ConsoleTimeout(f"Xen console: {pattern!r} did not appear within "
                                     f"{timeout:.0f}s; last output:\n{tail}")  # fmt: skip
            if abort is not None:
                abort()
            self.pump(0.1)

    def send_raw(self, data: bytes) -> None:
        """Straight to the UART: for the bootloader, before Xen owns the line."""
        self._write(data)

    # -- input focus ----------------------------------------------------------------------

    def switch_to(self, domid: int, timeout: float = 10.0) -> None:
        """Press Ctrl-A three times until Xen says the input goes to ``domid``."""
        for _ in range(6):
            if self.focus == domid:
                return
            seen = self._focus_seen
            self._write(CTRL_A * 3)
            deadline = time.monotonic() + timeout
            while self._focus_seen == seen:
                if time.monotonic() >= deadline:
                    raise ConsoleError(
                        f"Xen console: no '*** Serial input to' answer to Ctrl-A within "
                        f"{timeout:.0f}s (focus {self.focus}, wanted DOM{domid})"
                    )
                self.pump()
        raise ConsoleError(f"Xen console: input never reached DOM{domid} (at {self.focus})")

    def _write(self, data: bytes) -> None:
        try:
            self.port.write(data)
            self.port.flush()
        except (serial.SerialException, OSError) as e:
            raise ConsoleError(f"Xen console: write failed ({e})") from e

    def write(self, domid: int, data: bytes) -> int:
        """Send ``data`` to ``domid``, then park the input on Xen again.

        Pieces are small: Xen's vpl011 input FIFO holds 32 characters and drops what the
        guest has not read yet. The first Ctrl-A travels with the last piece, so Xen moves
        the focus away before the guest can answer: the domain that has the input is printed
        unbuffered and unprefixed, with line breaks of its own, unusable for framing.
        """
        self.switch_to(domid)
        pieces = [data[i : i + INPUT_CHUNK] for i in range(0, len(data), INPUT_CHUNK)] or [b""]
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            seen = self._focus_seen
            self._write(piece + (CTRL_A * 3 if last else b""))
            if not last:
                self.pump(self.pause)
        deadline = time.monotonic() + 10
        while self._focus_seen == seen and time.monotonic() < deadline:
            self.pump()
        self.switch_to(XEN)
        return len(data)

    def slow_down(self) -> None:
        """Input was lost: give the guests more time per piece."""
        self.pause = min(self.pause * 2, 0.2)

    def speed_up(self) -> None:
        """A command arrived intact: back towards the normal pace. (A loss under a load
        burst at boot once kept every later command at 4x the time.)"""
        self.pause = max(self.pause / 2, INPUT_PAUSE)

    def close(self) -> None:
        try:
            self.port.close()
        finally:
            if self._raw is not None:
                self._raw.close()
                self._raw = None


class DomainPort:
    """One domain's console as a pyserial-like port over the mux."""

    def __init__(self, mux: XenConsoleMux, domid: int) -> None:
        self.mux = mux
        self.domid = domid
        self.timeout = 0.1
        self.is_open = True

    @property
    def _buf(self) -> bytearray:
        return self.mux.domains.setdefault(self.domid, bytearray())

    def read(self, size: int = 1) -> bytes:
        if not self.is_open:
            raise serial.SerialException("port closed")
        deadline = time.monotonic() + (self.timeout or 0)
        while not self._buf:
            self.mux.pump(min(0.05, max(0.0, deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                break
        data = bytes(self._buf[:size])
        del self._buf[:size]
        return data

    @property
    def in_waiting(self) -> int:
        return len(self._buf)

    def write(self, data: bytes) -> int:
        return self.mux.write(self.domid, data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.is_open = False


class XenDomainConsole(Console):
    """A domain's console whose commands survive lost input characters.

    Xen's vpl011 drops input the guest has not read within its 32-character FIFO, which a
    loaded host provokes now and then. So every command travels with its own length: the
    shell runs it only if ``${#c}`` matches, else answers ``EVX<n>``; a missing answer or a
    mismatch (after Ctrl-C to drop a half line) sends it again, more slowly. The shell
    waits a moment before it answers: until Xen has moved the input focus away, the
    domain's output is printed unprefixed, with line breaks of Xen's own.
    """

    retries = 5
    answer_timeout = 5.0
    settle = 0.3

    def run(
        self, command: str, timeout: float = 30.0, abort: Callable[[], None] | None = None
    ) -> CommandResult:
        t0 = time.monotonic()
        quoted = command.replace("'", "'\\''")
        port = self.port
        for attempt in range(self.retries):
            n = next(self._ids)
            self.log.note(f"run #{n}: {command}" + (f" (attempt {attempt + 1})" if attempt else ""))
            self.sendline(
                f"c='{quoted}'; sleep {self.settle}; if [ ${{#c}} = {len(command.encode())} ];"
                f" then echo EV''B{n}; eval \"$c\"; echo EV''E{n} $?; else echo EV''X{n}; fi"
            )
            # Tolerate a break Xen put into the marker while the domain still had the focus.
            marker = (re.escape(ch).encode() for ch in f"EV#{n}")
            begin = b"\n?".join(marker).replace(b"\\#", b"([BX])")
            try:
                m = self.expect(begin + rb"\r?\n", self.answer_timeout, abort)
            except ConsoleTimeout:
                m = None
            if m is None or m.group(1) == b"X":
                self.send(b"\x03")
                self.drain(0.3, 2.0)
                if isinstance(port, DomainPort):
                    port.mux.slow_down()
                continue
            if isinstance(port, DomainPort):
                port.mux.speed_up()
            start = self.pos
            m = self.expect(rf"EVE{n} (\d+)\r?\n".encode(), timeout, abort)
            out = self.text(start, m.start()).decode("utf-8", "replace").replace("\r\n", "\n")
            if out.endswith("\n"):
                out = out[:-1]
            return CommandResult(command, int(m.group(1)), out, time.monotonic() - t0)
        raise ConsoleTimeout(
            f"{self.name}: command not received intact after {self.retries} attempts "
            f"(Xen console input lost); last console lines:\n{self.tail()}"
        )
