"""Interactive pass-through: the user's terminal ↔ the target's console, logged.

The terminal is put in raw mode so keys such as Ctrl-C reach the target; ``Ctrl-]``
(like telnet) ends the session. Everything the target sends still goes through the
Console, so the session is in the timestamped log and panics are still noticed.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import tty
from typing import IO

from edgevirt.console.expect import Console

ESCAPE = b"\x1d"  # Ctrl-]


def interact(
    console: Console,
    stdin: IO[bytes] | None = None,
    stdout: IO[bytes] | None = None,
    escape: bytes = ESCAPE,
) -> None:
    """Pass bytes both ways until ``escape`` is typed or the console drops."""
    fin = stdin or sys.stdin.buffer
    fout = stdout or sys.stdout.buffer
    fd = fin.fileno()
    saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    console.log.note("interactive session start")
    console.extra_failures = []
    try:
        if saved is not None:
            tty.setraw(fd)
        shown = console.pos
        while True:
            # Show what arrived (the Console keeps reading, logging and checking for panics).
            if console.end > shown:
                fout.write(console.text(shown))
                fout.flush()
                shown = console.end
                console.pos = shown
            ready, _, _ = select.select([fd], [], [], 0)
            if ready:
                data = os.read(fd, 1024)
                if not data or escape in data:
                    data = data.split(escape, 1)[0]
                    if data:
                        console.send(data)
                    return
                console.send(data)
            console._read()
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        console.log.note("interactive session end")
