"""Driving U-Boot over the serial console: stop autoboot, run commands, load, boot.

The same code serves QEMU's ``u-boot-qemu`` and a real board. Commands are framed like the
shell's (``cmd; echo EV''R<n> $?``): U-Boot's hush sets ``$?``, and the quotes keep the
echoed command line from matching the marker, so status and output are exact.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgevirt.console import ymodem
from edgevirt.console.expect import CommandResult, Console
from edgevirt.errors import ConsoleError, ConsoleTimeout, DeployError

log = logging.getLogger(__name__)

#: Printed by U-Boot when a boot went wrong before the kernel took over.
UBOOT_FAILURES = [
    re.compile(rb"Bad Linux ARM64 Image magic![^\n]*"),
    re.compile(rb"ERROR: can't get kernel image![^\n]*"),
    re.compile(rb"Wrong Image Format for bootm command[^\n]*"),
    re.compile(rb"Could not find a valid device tree[^\n]*"),
    re.compile(rb"resetting \.\.\.[^\n]*"),
]


#: U-Boot printed these once its countdown ran out: it is running bootcmd.
AUTOBOOT_STARTED = re.compile(
    rb"Starting kernel|## Booting|BOOTP broadcast|scanning bus|Scanning |starting USB|"
    rb"Hit any key to stop autoboot:\s+0\s*\n"
)
#: The same, for output seen before any banner: boards whose ``preboot`` is ``usb start``
#: (Raspberry Pi) print "starting USB…" and "scanning bus…" before the countdown.
BOOTING_WITHOUT_BANNER = re.compile(rb"Starting kernel|## Booting|BOOTP broadcast|Scanning ")


@dataclass(frozen=True)
class UBootSettings:
    prompt: str = "=> "
    autoboot: str = "Hit any key to stop autoboot"
    interrupt: str = " "
    #: Seconds to look for the autoboot banner after power-on.
    banner_timeout: float = 30.0
    #: Power cycles after a missed autoboot window before giving up.
    retries: int = 2
    #: ``loady ADDR BAUD``: the line runs at this rate for the transfer (U-Boot and the host
    #: switch together, then back), None to stay at the console's rate.
    loady_baudrate: int | None = None


class UBoot:
    def __init__(self, console: Console, settings: UBootSettings) -> None:
        self.console = console
        self.settings = settings
        self._n = 0

    def interrupt(self, abort: Callable[[], None] | None = None) -> None:
        """Stop the autoboot countdown and leave U-Boot at its prompt, in sync.

        Keys are sent repeatedly until the prompt appears: a single key can be lost while
        the UART is not yet read, and the prompt may follow countdown digits on one line.
        A prompt already on screen (bootdelay=0 boards, a re-attach) is accepted as is.
        """
        s = self.settings
        c = self.console
        banner = re.compile(
            re.escape(s.autoboot.encode())
            + b"|"
            + re.escape(s.prompt.encode())
            + b"|"
            + BOOTING_WITHOUT_BANNER.pattern
        )
        begin = c.pos
        first = c.expect(banner, s.banner_timeout, abort)
        if BOOTING_WITHOUT_BANNER.fullmatch(first.group(0)):
            raise self._missed()  # we came too late: it is already booting
        if first.group(0) == s.prompt.encode() and c.search(AUTOBOOT_STARTED, begin, first.start()):
            raise self._missed()  # the prompt after a failed bootcmd, not our interrupt
        start = first.end()
        deadline = time.monotonic() + 10.0
        prompt = re.compile(re.escape(s.prompt.encode()))
        while True:
            c.send(s.interrupt)
            try:
                m = c.expect(prompt, 0.25, abort)
            except ConsoleTimeout:
                if c.search(AUTOBOOT_STARTED, start) or time.monotonic() > deadline:
                    raise self._missed() from None
                continue
            # A prompt after the countdown ran out (bootcmd failed) is not ours: U-Boot has
            # already started booting something, so its state is not the one we want.
            if c.search(AUTOBOOT_STARTED, start, m.start()):
                raise self._missed()
            break
        self.sync()

    def _missed(self) -> AutobootMissed:
        return AutobootMissed(
            f"{self.console.name}: autoboot was not interrupted "
            f"(U-Boot went on to boot); last console lines:\n{self.console.tail()}"
        )

    def sync(self) -> None:
        """Discard the extra keys' effects: wait for quiet, then prove a round trip."""
        self.console.drain(0.3)
        self.run("true", 10)

    def run(
        self, command: str, timeout: float = 30.0, abort: Callable[[], None] | None = None
    ) -> CommandResult:
        self._n += 1
        n = self._n
        c = self.console
        t0 = time.monotonic()
        c.log.note(f"u-boot #{n}: {command}")
        c.sendline(f"{command}; echo EV''R{n} $?")
        # The echo of our own line ends at the first newline; the output follows it.
        c.expect(rb"\n", timeout, abort)
        start = c.pos
        m = c.expect(rf"EVR{n} (\d+)\r?\n".encode(), timeout, abort)
        output = c.text(start, m.start()).decode("utf-8", "replace").replace("\r\n", "\n")
        c.expect(re.escape(self.settings.prompt.encode()), 5, abort)
        return CommandResult(command, int(m.group(1)), output.rstrip("\n"), time.monotonic() - t0)

    def check(
        self, command: str, timeout: float = 30.0, abort: Callable[[], None] | None = None
    ) -> str:
        res = self.run(command, timeout, abort)
        if res.status != 0:
            raise DeployError(
                f"U-Boot: {command!r} failed (status {res.status}): {res.output.strip()[-600:]}"
            )
        return res.output

    def setenv(self, **values: str | int) -> None:
        for k, v in values.items():
            self.check(f"setenv {k} {v:#x}" if isinstance(v, int) else f"setenv {k} {v}")

    def filesize(self) -> int:
        out = self.check("printenv filesize")
        m = re.search(r"filesize=([0-9a-fA-F]+)", out)
        if not m:
            raise DeployError(f"U-Boot: no filesize after a load: {out!r}")
        return int(m.group(1), 16)

    def tftp(self, addr: int, name: str, abort: Callable[[], None] | None = None) -> int:
        self.check(f"tftpboot {addr:#x} {name}", 300, abort)
        return self.filesize()

    def loady(
        self,
        addr: int,
        path: Path,
        abort: Callable[[], None] | None = None,
        progress: ymodem.Progress | None = None,
    ) -> int:
        """Send ``path`` with ``loady`` (ymodem over the console itself); ``progress(done,
        total)`` after each block: at a UART's pace a kernel takes minutes."""
        self._n += 1
        c = self.console
        line = c.port.baudrate
        rate = self.settings.loady_baudrate or line
        switch = rate != line
        c.log.note(f"u-boot loady {path} -> {addr:#x}" + (f" at {rate} bps" if switch else ""))
        if switch:
            # U-Boot announces the switch at the old rate, changes, then waits for a CR at
            # the new one; after the transfer it announces going back and waits for ESC.
            c.sendline(f"loady {addr:#x} {rate}")
            c.expect(rb"## Switch baudrate to \d+ bps and press ENTER", 10, abort)
            self._set_rate(rate)
            c.send(b"\r")
        else:
            c.sendline(f"loady {addr:#x}")
        c.expect(rb"Ready for binary \(ymodem\) download[^\n]*\n", 10, abort)
        try:
            sent = ymodem.send(c.getc, c.send, path, progress=progress)
            m = c.expect(rb"## Total Size\s+= 0x([0-9a-fA-F]+) = \d+ Bytes", 30, abort)
        finally:
            if switch:
                c.expect(rb"## Switch baudrate to \d+ bps and press ESC", 10, abort)
                self._set_rate(line)
                c.send(b"\x1b")
        c.expect(re.escape(self.settings.prompt.encode()), 10, abort)
        got = int(m.group(1), 16)
        if got != sent:
            raise DeployError(f"U-Boot: loady received {got} bytes of {path} ({sent} sent)")
        return got

    def _set_rate(self, rate: int) -> None:
        """The host's side of a baud switch; U-Boot waits 50 ms around its own."""
        time.sleep(0.1)
        self.console.port.baudrate = rate
        self.console.log.note(f"line now at {rate} bps")

    def has_command(self, name: str) -> bool:
        """Whether this U-Boot was built with ``name``. ``help <cmd>`` returns 1 for known
        commands too (it prints their usage), so the answer is in the text."""
        out = self.run(f"help {name}", 10).output
        return "Unknown command" not in out and f"{name} -" in out

    def loady_lzma(
        self,
        addr: int,
        packed: Path,
        size: int,
        scratch: int,
        abort: Callable[[], None] | None = None,
        progress: ymodem.Progress | None = None,
    ) -> int:
        """Send ``packed`` (:func:`lzma_alone`) to ``scratch`` with ``loady``, ``lzmadec`` it
        to ``addr``; returns the size U-Boot reports, checked against ``size``.

        A 115200-baud line moves ~11 KiB/s (QEMU's one-byte-per-wakeup UART models as
        little on a loaded host), so the ~3x smaller payload is minutes saved.
        """
        self.loady(scratch, packed, abort, progress)
        self.check(f"lzmadec {scratch:#x} {addr:#x}", 120, abort)
        got = self.filesize()
        if got != size:
            raise DeployError(
                f"U-Boot: lzmadec of {packed.name} gave {got} bytes at {addr:#x}, expected {size}"
            )
        return got

    def boot(self, command: str) -> None:
        """Hand over to the kernel: no marker can follow, so only the handover is awaited."""
        c = self.console
        c.log.note(f"u-boot boot: {command}")
        c.extra_failures = list(UBOOT_FAILURES)
        c.sendline(command)
        c.expect(rb"Starting kernel[^\n]*\n", 60)
        c.extra_failures = []


class AutobootMissed(ConsoleError):
    """The autoboot countdown ended before U-Boot saw our key."""


def lzma_alone(data: bytes, out: Path) -> Path:
    """``data`` in the legacy ``.lzma`` ("alone") format U-Boot's ``lzmadec`` reads, kept at
    ``out`` with the input's sha256 beside it: compressing a kernel costs ~20 s of CPU, so
    an unchanged input is not compressed again. The header's size field stays "unknown"
    (lzmadec then stops at the end marker; a filled-in size made it hang, tried here)."""
    import hashlib
    import lzma
    import os

    digest = hashlib.sha256(data).hexdigest()
    stamp = out.with_name(out.name + ".sha256")
    if out.exists() and stamp.exists() and stamp.read_text() == digest:
        return out
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    tmp.write_bytes(lzma.compress(data, format=lzma.FORMAT_ALONE, preset=6))
    os.replace(tmp, out)
    stamp.write_text(digest)
    return out
