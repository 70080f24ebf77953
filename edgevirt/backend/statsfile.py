"""The back-end's stats file: JSON rewritten atomically for launchers that poll it.

Every back-end process (vhost-user, virtio-msg on the host or in a service VM) writes its
counters the same way: the whole snapshot to ``<name>.tmp``, then ``rename`` over the file,
so a reader never sees half a file; an unchanged snapshot is not rewritten.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


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
