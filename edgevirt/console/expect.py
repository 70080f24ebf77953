"""Expect engine over any pyserial port, with marker-framed command execution.

``run`` wraps a shell command between two markers that the command line itself cannot
match (the markers are split with an empty quote pair, ``EV''B``), so terminal echo, a
prompt, or kernel messages printed before the frame do not confuse the parser. Every byte
read is logged with a timestamp. While waiting, panics and oopses are detected and raised
as :class:`ConsoleError` quoting the offending lines.

**Bounded work per read.** Offsets (``pos``, match offsets, :meth:`Console.text`) count
bytes since the console was opened. Memory holds a window: everything not yet consumed by an
expect plus :data:`KEEP_BEHIND` bytes before it (the log file on disk has it all). While an
expect waits, each new read is searched together with at most :data:`SEARCH_WINDOW` bytes
before it, never the whole history again: a 4 MiB boot log costs one pass, not one pass per
read. The price: a match longer than ``SEARCH_WINDOW`` that straddles two reads is not found.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import serial

import edgevirt.console  # noqa: F401  (registers unix://)
from edgevirt.errors import ConsoleError, ConsoleTimeout

#: Lines that mean the target is dead or dying, whatever we are waiting for.
FAILURE_PATTERNS = [
    re.compile(rb"Kernel panic - not syncing[^\n]*"),
    re.compile(rb"Internal error: Oops[^\n]*"),
    re.compile(rb"Unable to handle kernel [^\n]*"),
    re.compile(rb"Login incorrect[^\n]*"),
]
POLL = 0.1
#: Bytes before the newly read data that a waiting expect searches again: the longest match
#: that can straddle two reads.
SEARCH_WINDOW = 64 * 1024
#: Consumed bytes kept in memory behind ``pos`` (tail(), look-backs such as U-Boot's).
KEEP_BEHIND = 256 * 1024
#: Never more than this in memory, consumed or not (a console that floods without pause).
MAX_BUFFER = 64 * 1024 * 1024
#: Trim in steps of at least this much, so that the memmove is amortised.
_TRIM_STEP = 1024 * 1024


class ConsoleMatch:
    """A match in the console stream: :class:`re.Match`'s accessors, offsets since open."""

    def __init__(self, m: re.Match[bytes], base: int) -> None:
        self._m, self._base = m, base

    def group(self, *groups: int | str) -> Any:
        return self._m.group(*groups)

    def groups(self) -> tuple[bytes | Any, ...]:
        return self._m.groups()

    def start(self, group: int | str = 0) -> int:
        return self._base + self._m.start(group)

    def end(self, group: int | str = 0) -> int:
        return self._base + self._m.end(group)

    def span(self, group: int | str = 0) -> tuple[int, int]:
        return self.start(group), self.end(group)


@dataclass
class CommandResult:
    command: str
    status: int
    output: str
    seconds: float


class ConsoleLog:
    """Timestamped console transcript: ``[   1.234] text`` per line, flushed as it arrives."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._f: IO[str] | None = open(path, "a", buffering=1) if path else None  # noqa: SIM115
        self._t0 = time.monotonic()
        self._partial = ""

    def feed(self, data: bytes) -> None:
        if self._f is None:
            return
        text = self._partial + data.decode("utf-8", "replace").replace("\r", "")
        *lines, self._partial = text.split("\n")
        stamp = f"[{time.monotonic() - self._t0:9.3f}] "
        for line in lines:
            self._f.write(stamp + line + "\n")

    def note(self, text: str) -> None:
        if self._f is not None:
            self._f.write(f"[{time.monotonic() - self._t0:9.3f}] ## {text}\n")

    def close(self) -> None:
        if self._f is not None:
            if self._partial:
                self._f.write(self._partial + "\n")
            self._f.close()
            self._f = None


class Console:
    def __init__(
        self, port: serial.SerialBase, *, log_path: Path | None = None, name: str = "console"
    ) -> None:
        self.port = port
        self.name = name
        self.log = ConsoleLog(log_path)
        self._buf = bytearray()  # the bytes from offset ``base`` on
        self.base = 0
        self.pos = 0  # everything before this offset has been consumed by an expect
        self._scan = 0  # failure patterns already checked up to here
        self._ids = itertools.count(1)
        #: Bytes handed to the regex engine by expect, and the largest single search: a
        #: waiting expect costs O(data + reads × SEARCH_WINDOW) (bench/console.py measures it).
        self.searched_bytes = 0
        self.largest_search = 0
        #: Extra failure patterns for the current phase (a bootloader adds its own).
        self.extra_failures: list[re.Pattern[bytes]] = []

    @classmethod
    def open(
        cls,
        url: str,
        *,
        log_path: Path | None = None,
        connect_timeout: float = 10.0,
        baudrate: int = 115200,
        name: str = "console",
    ) -> Console:
        """Open ``url`` (``/dev/ttyUSB0``, ``socket://h:p``, ``rfc2217://h:p``, ``unix:///p``)."""
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                port = serial.serial_for_url(url, baudrate=baudrate, timeout=POLL)
                return cls(port, log_path=log_path, name=name)
            except (serial.SerialException, OSError) as e:
                if time.monotonic() >= deadline:
                    raise ConsoleError(
                        f"{name}: cannot open {url} within {connect_timeout:.0f}s: {e}"
                    ) from e
                time.sleep(0.1)

    def close(self) -> None:
        try:
            self.port.close()
        finally:
            self.log.close()

    # -- reading --------------------------------------------------------------------------

    @property
    def end(self) -> int:
        """Offset just past the last byte read."""
        return self.base + len(self._buf)

    def text(self, start: int, end: int | None = None) -> bytes:
        """The bytes between two offsets (``end`` default: all read so far). Bytes no longer
        in memory are replaced by a note pointing at the log."""
        end = self.end if end is None else min(end, self.end)
        if start >= self.base:
            return bytes(self._buf[start - self.base : max(start, end) - self.base])
        lost = min(self.base, end) - start
        where = self.log.path or "the console log (none kept)"
        note = f"[... {lost} bytes no longer in memory: see {where}]\n".encode()
        return note + bytes(self._buf[: max(0, end - self.base)])

    def search(
        self, pattern: re.Pattern[bytes], start: int, end: int | None = None
    ) -> ConsoleMatch | None:
        """``pattern`` between two offsets (what is still in memory of them)."""
        lo = max(start, self.base) - self.base
        hi = len(self._buf) if end is None else max(lo, min(end, self.end) - self.base)
        m = pattern.search(self._buf, lo, hi)
        return ConsoleMatch(m, self.base) if m else None

    def _append(self, data: bytes) -> None:
        self._buf += data
        self.log.feed(data)
        self._trim()

    def _trim(self) -> None:
        """Drop what no offset still needs: consumed bytes beyond KEEP_BEHIND, and anything
        beyond MAX_BUFFER (then the oldest unconsumed bytes go too; the log has them).

        Called on new data and when an expect starts, never between a match and the
        caller's use of it (``run`` slices its output after the end marker matched)."""
        keep_from = max(self.pos - KEEP_BEHIND, self.end - MAX_BUFFER)
        if keep_from - self.base >= _TRIM_STEP:
            del self._buf[: keep_from - self.base]
            self.base = keep_from
            if self.pos < self.base:
                self.log.note(f"console buffer full: {self.base - self.pos} unread bytes dropped")
                self.pos = self.base
            self._scan = max(self._scan, self.base)

    def _read(self) -> None:
        try:
            # pyserial's read(n) waits for all n bytes or the timeout: ask for one byte
            # (returns as soon as anything arrives), then for what is known to be waiting.
            data = self.port.read(1)
            if data:
                n = self.port.in_waiting
                if n:
                    data += self.port.read(min(n, 1 << 20))
        except (serial.SerialException, OSError) as e:
            raise ConsoleError(
                f"{self.name}: disconnected ({e}); last lines:\n{self.tail()}"
            ) from e
        if data:
            self._append(data)
            self._check_failures()

    def _check_failures(self) -> None:
        start = max(self.base, self._scan - 256)
        for pat in [*FAILURE_PATTERNS, *self.extra_failures]:
            m = self.search(pat, start)
            if m:
                # Give the rest of the report a moment to arrive, then quote it.
                end = time.monotonic() + 1.0
                while time.monotonic() < end:
                    more = self.port.read(max(1, self.port.in_waiting))
                    if more:
                        self._append(more)
                text = self.text(m.start(), m.start() + 2000).decode("utf-8", "replace")
                raise ConsoleError(f"{self.name}: target failed: {text.strip()}")
        self._scan = self.end

    def _explain_disconnect(self, abort: Callable[[], None], grace: float = 1.0) -> None:
        """A console that drops usually means the target died: give the abort check (QEMU
        exited, quoting its stderr) a moment to say so; its error is the better one."""
        end = time.monotonic() + grace
        while time.monotonic() < end:
            abort()
            time.sleep(0.05)

    def tail(self, lines: int = 15) -> str:
        text = self._buf[-4000:].decode("utf-8", "replace").replace("\r", "")
        return "\n".join(text.rstrip("\n").split("\n")[-lines:])

    def expect(
        self,
        pattern: str | bytes | re.Pattern[bytes],
        timeout: float,
        abort: Callable[[], None] | None = None,
    ) -> ConsoleMatch:
        """Wait for ``pattern`` after the last consumed position; consume through the match.

        Each pass searches from ``pos``, or from ``SEARCH_WINDOW`` bytes before what the
        previous pass had not seen, whichever is later (module docstring)."""
        if isinstance(pattern, str):
            pattern = pattern.encode()
        pat = re.compile(pattern) if isinstance(pattern, bytes) else pattern
        deadline = time.monotonic() + timeout
        self._trim()
        seen = self.pos  # bytes up to here were searched without a match
        while True:
            start = max(self.pos, seen - SEARCH_WINDOW, self.base)
            self.searched_bytes += self.end - start
            self.largest_search = max(self.largest_search, self.end - start)
            m = self.search(pat, start)
            if m:
                self.pos = m.end()
                return m
            seen = self.end
            if time.monotonic() >= deadline:
                self.log.note(f"timeout after {timeout:.0f}s waiting for {pat.pattern!r}")
                raise ConsoleTimeout(
                    f"{self.name}: {pat.pattern.decode(errors='replace')!r} did not appear "
                    f"within {timeout:.0f}s; last console lines:\n{self.tail()}"
                )
            if abort is not None:
                abort()
            try:
                self._read()
            except ConsoleError:
                if abort is not None:
                    self._explain_disconnect(abort)
                raise

    def getc(self, timeout: float) -> int | None:
        """Next unconsumed byte (binary protocols such as ymodem), or None after ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.pos >= self.end:
            if time.monotonic() >= deadline:
                return None
            self._read()
        c = self._buf[self.pos - self.base]
        self.pos += 1
        return c

    def drain(self, quiet: float = 0.2, limit: float = 5.0) -> None:
        """Read until the line has been silent for ``quiet`` seconds; consume it all."""
        end = time.monotonic() + limit
        while time.monotonic() < end:
            n = self.end
            t = time.monotonic() + quiet
            while time.monotonic() < t and self.end == n:
                self._read()
            if self.end == n:
                break
        self.pos = self.end

    # -- writing --------------------------------------------------------------------------

    def send(self, text: str | bytes) -> None:
        try:
            self.port.write(text.encode() if isinstance(text, str) else text)
            self.port.flush()
        except serial.SerialException as e:
            raise ConsoleError(f"{self.name}: write failed ({e})") from e

    def sendline(self, text: str) -> None:
        self.send(text + "\n")

    def run(
        self, command: str, timeout: float = 30.0, abort: Callable[[], None] | None = None
    ) -> CommandResult:
        """Run ``command`` in the target's shell; return its exit status and output."""
        n = next(self._ids)
        t0 = time.monotonic()
        self.log.note(f"run #{n}: {command}")
        self.sendline(f"echo EV''B{n}; {command}; echo EV''E{n} $?")
        self.expect(rf"EVB{n}\r?\n".encode(), timeout, abort)
        start = self.pos
        m = self.expect(rf"EVE{n} (\d+)\r?\n".encode(), timeout, abort)
        output = self.text(start, m.start()).decode("utf-8", "replace").replace("\r\n", "\n")
        if output.endswith("\n"):  # the newline before the end marker is the frame's, not output
            output = output[:-1]
        return CommandResult(command, int(m.group(1)), output, time.monotonic() - t0)
