"""virtio-rng (virtio spec 5.4): fill every device-writable buffer from the host's CSPRNG."""

from __future__ import annotations

import os

from edgevirt.backend.devices.base import Chain, VirtioDevice, views
from edgevirt.backend.memory import GuestMemory

#: Cap per request so a guest asking for huge buffers cannot stall the event loop.
MAX_PER_REQUEST = 64 * 1024


class RngDevice(VirtioDevice):
    name = "rng"
    device_id = 4

    def handle(self, queue: int, chain: Chain, mem: GuestMemory) -> int:
        self.stats.requests += 1
        written = 0
        for view in views(mem, chain.writable):
            take = min(len(view), MAX_PER_REQUEST - written)
            if take <= 0:
                break
            view[:take] = os.urandom(take)
            written += take
        self.stats.bytes_written += written
        return written
