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

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._sel.register(fd, selectors.EVENT_READ, callback)

    def remove_reader(self, fd: int) -> None:
        try:
            self._sel.unregister(fd)
        except (KeyError, ValueError):
            pass

    def every(self, seconds: float, callback: Callable[[], None]) -> None:
        self._ticks.append((seconds, callback, [time.monotonic() + seconds]))

    def stop(self) -> None:
        self.running = False

    def run(self) -> None:
        self.running = True
        while self.running:
            timeout = 0.5
            now = time.monotonic()
            for period, cb, due in self._ticks:
                if now >= due[0]:
                    due[0] = now + period
                    cb()
                timeout = min(timeout, max(0.0, due[0] - now))
            for key, _ in self._sel.select(timeout):
                key.data()
                if not self.running:
                    break

    def close(self) -> None:
        self._sel.close()
