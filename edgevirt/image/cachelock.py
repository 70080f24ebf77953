"""One build per cache key at a time, and no staging directories left behind by the dead.

Two ``edgevirt`` processes that need the same kernel (two test workers, ``make demo`` while
a test runs) must not both spend eight minutes and 1.5 GB building it: the second waits on
the first's lock and then finds the cache entry. A build whose process was killed leaves its
``.build-<key>-<pid>`` staging directory behind; the next build removes it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def build_lock(
    root: Path, key: str, on_wait: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold the exclusive build lock of ``key`` under ``root`` (blocking, with a notice).

    ``flock`` dies with its process, so a killed build never leaves a stale lock.
    """
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / f".lock-{key}", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            msg = f"another edgevirt (pid {holder}) is building {key}: waiting for it"
            log.info("%s", msg)
            if on_wait is not None:
                on_wait(msg)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def remove_stale_stages(root: Path, key: str) -> list[Path]:
    """Remove staging dirs nobody is using; call with ``key``'s lock held.

    Every ``.build-<key>-*`` is stale (the lock says nobody else builds ``key``); one of
    another key is stale when its process is gone. ``.old-*`` leftovers of an interrupted
    install go too.
    """
    removed = []
    for d in root.glob(".build-*"):
        name = d.name[len(".build-") :]
        this_key, _, pid = name.rpartition("-")
        stale = this_key == key or (pid.isdigit() and not _pid_alive(int(pid)))
        if stale:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    for d in root.glob(".old-*"):
        pid = d.name.rpartition("-")[2]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    for d in removed:
        log.info("removed stale staging directory %s", d)
    return removed
