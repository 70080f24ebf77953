"""How long-running library work reports progress without printing (the CLI renders it)."""

from __future__ import annotations

import logging

log = logging.getLogger("edgevirt")


class Reporter:
    """Default: log steps, ignore progress. The CLI's RichReporter draws steps and bars."""

    def step(self, text: str) -> None:
        log.info("%s", text)

    def progress(self, phase: str, done: int, total: int) -> None:
        """``done`` of ``total`` units of ``phase`` (compile steps, bytes, blocks…)."""
