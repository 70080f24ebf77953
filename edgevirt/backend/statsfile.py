"""What every back-end process shares: its stats file and its serve-until-signal loop.

Every back-end process (vhost-user, virtio-msg on the host or in a service VM) writes its
counters the same way: the whole snapshot to ``<name>.tmp``, then ``rename`` over the file,
so a reader never sees half a file; an unchanged snapshot is not rewritten. Every snapshot
starts with the same process keys (:func:`process_stats`). Each serves on one
:class:`~edgevirt.backend.loop.Loop` until SIGTERM or SIGINT (:func:`serve_until_signal`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

from edgevirt.backend.loop import Loop
from edgevirt.backend.virtq import SplitQueue

log = logging.getLogger(__name__)


class StatsFile:
    """``write(snapshot)`` replaces the file when the snapshot changed (or ``force``)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._last = ""

    def write(self, snapshot: dict, force: bool = False) -> None:
        if self.path is None:
            return
        text = json.dumps(snapshot, indent=2)
        if text == self._last and not force:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)
        self._last = text


def process_stats(loop: Loop) -> dict:
    """The keys every back-end's snapshot starts with: who, which ring code, serving or not."""
    return {"pid": os.getpid(), "ring": SplitQueue.__module__, "running": loop.running}


def serve_until_signal(
    loop: Loop, stats: StatsFile, snapshot: Callable[[], dict], stopping: str = "stopping"
) -> None:
    """Run ``loop`` until SIGTERM/SIGINT, with the stats file saying ``running`` meanwhile.

    A signal only ends the loop between callbacks; the previous handlers are back and
    ``loop.running`` is false when this returns (or raises). The caller closes.
    """

    got: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        # Only flags here: a handler that logs can interrupt the main thread's own write to
        # stderr ("reentrant call" RuntimeError out of the handler), and the stop is lost.
        got.append(signum)
        loop.stop()

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        loop.running = True
        stats.write(snapshot(), force=True)
        loop.run()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        loop.running = False
    if got:
        log.info("signal %d: %s", got[0], stopping)
