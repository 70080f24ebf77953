"""A minimal single-threaded event loop: readable fds → callbacks, plus periodic ticks.

One loop serves every device of a back-end process. Callbacks must not block; the loop
survives a callback's exception only in the sense that the owner decides: exceptions
propagate, and the transports catch what a peer can cause.
"""

from __future__ import annotations

import selectors
import time
from collections.abc import Callable


class Loop:
    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._ticks: list[tuple[float, Callable[[], None], list[float]]] = []
        self.running = False
        self._stop_requested = False

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` while ``fd`` is readable; registering again replaces it."""
        self._set(fd, 0, callback)

    def remove_reader(self, fd: int) -> None:
        self._set(fd, 0, None)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` while ``fd`` is writable (remove it once nothing is queued)."""
        self._set(fd, 1, callback)

    def remove_writer(self, fd: int) -> None:
        self._set(fd, 1, None)

    def _set(self, fd: int, which: int, callback: Callable[[], None] | None) -> None:
        try:
            key = self._sel.get_key(fd)
            pair = list(key.data)
        except (KeyError, ValueError):
            key, pair = None, [None, None]
        pair[which] = callback
        events = (selectors.EVENT_READ if pair[0] else 0) | (
            selectors.EVENT_WRITE if pair[1] else 0
        )
        try:
            if key is None and events:
                self._sel.register(fd, events, tuple(pair))
            elif key is not None and events:
                self._sel.modify(fd, events, tuple(pair))
            elif key is not None:
                self._sel.unregister(fd)
        except (KeyError, ValueError, OSError):
            pass  # the fd was closed under us: nothing to watch

    def _current(self, fd: int, which: int) -> Callable[[], None] | None:
        """The callback registered for ``fd`` now (0 reader, 1 writer), or None."""
        try:
            return self._sel.get_key(fd).data[which]  # type: ignore[no-any-return]
        except (KeyError, ValueError):
            return None

    def every(self, seconds: float, callback: Callable[[], None]) -> None:
        self._ticks.append((seconds, callback, [time.monotonic() + seconds]))

    def stop(self) -> None:
        self.running = False
        self._stop_requested = True

    def run(self) -> None:
        # A stop that came before run() (a signal right after its handler was installed) is
        # not lost: this run returns at once.
        self.running = not self._stop_requested
        self._stop_requested = False
        while self.running:
            timeout = 0.5
            now = time.monotonic()
            for period, cb, due in self._ticks:
                if now >= due[0]:
                    due[0] = now + period
                    cb()
                timeout = min(timeout, max(0.0, due[0] - now))
            for key, events in self._sel.select(timeout):
                reader, writer = key.data
                # An earlier callback of this batch may have removed or replaced this reader
                # (a disconnect closes the vrings' kick fds): its stale event is dropped, or
                # it would read a closed (or reused) fd.
                current = self._current(key.fd, 0)
                if events & selectors.EVENT_READ and current is not None and current is reader:
                    current()
                if events & selectors.EVENT_WRITE and writer is not None:
                    # The reader may have dropped the writer: ask the selector again.
                    writer = self._current(key.fd, 1)
                    if writer is not None:
                        writer()
                if not self.running:
                    break

    def close(self) -> None:
        self._sel.close()
