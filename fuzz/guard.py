"""The invariant every parser target checks, in one place.

:class:`Guard` runs one input through a parser and turns any breach into an AssertionError
(which atheris reports as a crash and saves the input):

- **only edgevirt's exceptions**: anything raised that is not an instance of the allowed
  classes (``EdgevirtError`` unless a target says more) is a bug, even ``ValueError``;
- **no hang**: an interval timer interrupts a call that runs longer than ``timeout``
  seconds (C code that never returns to Python is caught by atheris' own ``-timeout``);
- **no write outside the output directory**: an audit hook sees every path-based open for
  writing, mkdir, symlink, link, rename, remove and chmod while the target runs, and refuses
  paths outside ``out``; writes relative to a directory descriptor are caught afterwards by
  listing the private directory around ``out`` (the "jail"), which must hold nothing else.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgevirt.errors import EdgevirtError

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {  # audit event -> indices of path arguments
    "os.mkdir": (0,), "os.symlink": (1,), "os.link": (1,), "os.rename": (0, 1),
    "os.remove": (0,), "os.rmdir": (0,), "os.chmod": (0,), "os.truncate": (0,),
    "shutil.rmtree": (0,), "os.utime": (0,), "os.chown": (0,),
}  # fmt: skip


class Hang(BaseException):
    """Raised by the interval timer (a BaseException: no target may swallow it)."""


class Guard:
    def __init__(self, *, allowed: tuple[type[BaseException], ...] = (EdgevirtError,),
                 timeout: float = 2.0) -> None:  # fmt: skip
        self.allowed = allowed
        self.timeout = timeout
        self.jail = Path(tempfile.mkdtemp(prefix="edgevirt-fuzz-")).resolve()
        self.out = self.jail / "out"
        self.out.mkdir()
        self.escapes: list[str] = []
        #: Names beside ``out`` that the target set up itself (fixtures, not escapes).
        self.jail_extra: set[str] = set()
        self._active = False
        sys.addaudithook(self._audit)

    def _inside(self, path: Any) -> bool:
        if isinstance(path, int) or path is None:
            return True  # an fd: checked by the jail listing
        p = Path(os.fsdecode(path))
        if not p.is_absolute():
            p = Path(os.getcwd()) / p
        p = Path(os.path.normpath(p))
        return p == self.out or p.is_relative_to(self.out)

    def _audit(self, event: str, args: tuple[Any, ...]) -> None:
        if not self._active:
            return
        if event == "open":
            path, mode, flags = (list(args) + [None, None])[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS
            )
            if writing and not self._inside(path):
                self.escapes.append(f"open {path!r} for writing")
        elif event in _PATH_EVENTS:
            dir_fd_given = any(isinstance(a, int) and a >= 0 for a in args[2:])
            for i in _PATH_EVENTS[event]:
                if i < len(args) and not dir_fd_given and not self._inside(args[i]):
                    self.escapes.append(f"{event} {args[i]!r}")

    def _alarm(self, signum: int, frame: Any) -> None:
        raise Hang()

    def run(self, fn: Callable[[Path], object]) -> None:
        """Call ``fn(out)`` with a fresh, empty ``out`` as the working directory."""
        shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir()
        cwd = os.getcwd()
        os.chdir(self.out)
        old = signal.signal(signal.SIGALRM, self._alarm)
        signal.setitimer(signal.ITIMER_REAL, self.timeout)
        self.escapes = []
        self._active = True
        try:
            fn(self.out)
        except self.allowed:
            pass
        except Hang:
            raise AssertionError(f"hang: the call took longer than {self.timeout} s") from None
        finally:
            self._active = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
            os.chdir(cwd)
        stray = sorted(
            p.name for p in self.jail.iterdir() if p.name != "out" and p.name not in self.jail_extra
        )
        if self.escapes or stray:
            for name in stray:
                shutil.rmtree(self.jail / name, ignore_errors=True)
                (self.jail / name).unlink(missing_ok=True)
            raise AssertionError(f"wrote outside the output directory: {self.escapes + stray}")
