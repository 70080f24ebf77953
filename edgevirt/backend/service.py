"""The back-end process: several devices, one event loop, a stats file for observers.

The stats file is rewritten atomically (write + rename) whenever it changes, at most a few
times a second, so a launcher can poll it: it holds per-device counters, the memory the
back-end mapped, accesses it refused and any queue it marked broken.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from edgevirt.backend.devices import VirtioDevice
from edgevirt.backend.loop import Loop
from edgevirt.backend.statsfile import StatsFile, process_stats, serve_until_signal
from edgevirt.backend.transport.vhost_user.backend import VhostUserBackend

log = logging.getLogger(__name__)


@dataclass
class Endpoint:
    device: VirtioDevice
    socket: Path


class BackendService:
    def __init__(self, endpoints: list[Endpoint], stats_path: Path | None = None) -> None:
        self.loop = Loop()
        self.stats_path = stats_path
        self.stats = StatsFile(stats_path)
        self.backends: list[VhostUserBackend] = []
        try:
            for ep in endpoints:
                self.backends.append(VhostUserBackend(ep.device, str(ep.socket), self.loop))
        except BaseException:
            self.close()
            raise
        self.loop.every(0.2, self.write_stats)

    def snapshot(self) -> dict:
        return {**process_stats(self.loop), "devices": [b.snapshot() for b in self.backends]}

    def write_stats(self, force: bool = False) -> None:
        self.stats.write(self.snapshot(), force)

    def run(self) -> dict:
        """Serve until SIGTERM/SIGINT; return the final statistics.

        Stopping is a drain: a signal only ends the loop between callbacks, and every
        chain a callback takes is completed (used entry published) before it returns, so
        nothing is left in flight; what the driver queued after that is served by the next
        back-end (the inflight region and used->idx tell it where to resume).
        """
        final: dict = {}
        try:
            serve_until_signal(
                self.loop, self.stats, self.snapshot, "stopping after the current batch"
            )
        finally:
            left = sum(b.in_flight() for b in self.backends)
            log.info("stopped: %d chains in flight", left)
            final = self.snapshot()
            self.close()
        return final

    def close(self) -> None:
        final = self.snapshot()
        for b in self.backends:
            b.close()
        self.backends = []
        if final["devices"]:
            # The last word is the counters as they were, not an empty device list.
            final["running"] = False
            self.stats.write(final, force=True)
