"""What a virtio device looks like to a transport.

A device sees descriptor chains (lists of guest-physical segments) and the guest memory,
never ring indices, so the same device runs over vhost-user, virtio-msg or anything else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from edgevirt.backend.memory import GuestMemory

Segment = tuple[int, int]  # (gpa, length)


@dataclass
class Chain:
    head: int
    readable: Sequence[Segment]
    writable: Sequence[Segment]


@dataclass
class DeviceStats:
    requests: int = 0
    bytes_read: int = 0  # guest → device
    bytes_written: int = 0  # device → guest
    errors: int = 0
    by_type: dict[str, int] = field(default_factory=dict)


class VirtioDevice:
    """Base class: device ID, offered device features, config space, chain handling."""

    name = "device"
    device_id = 0
    num_queues = 1
    #: Device-specific feature bits (transport bits are added by the transport).
    features = 0

    def __init__(self) -> None:
        self.stats = DeviceStats()
        self.acked_features = 0

    def config(self) -> bytes:
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """Most devices have a read-only config space: writes are ignored, as the spec allows."""

    def handle(self, queue: int, chain: Chain, mem: GuestMemory) -> int:
        """Serve one chain; return the number of bytes written into device-writable buffers."""
        raise NotImplementedError

    def reset(self) -> None:
        self.acked_features = 0

    def close(self) -> None:
        pass


def gather(mem: GuestMemory, segs: Sequence[Segment], length: int) -> bytes:
    """Read the first ``length`` bytes spread over ``segs``."""
    out = bytearray()
    for gpa, n in segs:
        take = min(n, length - len(out))
        if take <= 0:
            break
        out += mem.translate(gpa, take)
    return bytes(out)


def views(
    mem: GuestMemory, segs: Sequence[Segment], skip: int = 0, drop_tail: int = 0
) -> list[memoryview]:
    """Writable views over ``segs`` minus ``skip`` leading and ``drop_tail`` trailing bytes."""
    total = sum(n for _, n in segs)
    end = total - drop_tail
    out: list[memoryview] = []
    pos = 0
    for gpa, n in segs:
        lo, hi = max(pos, skip), min(pos + n, end)
        if lo < hi:
            out.append(mem.translate(gpa + (lo - pos), hi - lo))
        pos += n
    return out
