"""What a virtio device looks like to a transport.

A device sees descriptor chains (lists of guest-physical segments) and the guest memory,
never ring indices, so the same device runs over vhost-user, virtio-msg or anything else.

The device interface
====================

Transports (vhost-user, virtio-msg, …) drive a :class:`VirtioDevice` through these calls,
all on the back-end's one event loop thread:

``attach(host)``
    Once, when the transport takes the device. ``host`` is the transport's
    :class:`DeviceHost`: the event loop (``add_reader``, ``add_writer``, their removals,
    ``every``), the guest memory as it is *now* (``host.mem``; vhost-user replaces it on
    SET_MEM_TABLE) and the one completion path, ``host.complete``.
``handle(queue, chain, mem) -> int``
    One chain the driver made available. Return the bytes written into its device-writable
    buffers: the transport publishes the used entry at once, batched with the other chains
    of the same pop. Or return :data:`DEFERRED`: the device keeps the chain and completes it
    later (a net RX buffer waiting for a frame, a vsock RX buffer waiting for socket data, a
    GPIO event buffer waiting for an edge, an io_uring read waiting for its CQE). Raising
    :class:`~edgevirt.errors.BackendError` marks that queue broken (the chain cannot be
    answered at all); a chain whose *content* is bad should be answered (status byte, zero
    length) or dropped and counted, not break the queue.
``host.complete(queue, [(chain, written), …])``
    Completes deferred chains, in any order (split rings allow used entries out of order),
    from any loop callback (an fd became readable, a timer). The transport writes the used
    entries, keeps its inflight bookkeeping and notifies the driver once per call, so a
    device completes in batches where it can. A chain belongs to one *start* of its queue
    (``chain.epoch``): completing a chain of an earlier start (the queue was reset or
    restarted since) is ignored and counted as stale, never written into a reused ring.
``queue_stopped(queue)``
    The transport stopped the queue (reset, reconnect, new memory table, driver's
    RESET_VQUEUE): the device drops every chain it deferred on that queue and must not touch
    their buffers again. The chains are not completed; their buffers belong to the driver
    again after its reset (vhost-user's inflight region resubmits them where it is used).
``reset()``
    Device reset: every queue stopped, negotiated state forgotten; host-side resources that
    outlive a driver (a TAP, a listening socket) stay open.
``close()``
    The back-end is shutting down: release everything.

``acked_features``
    Set by the transport once the driver's features are final (vhost-user SET_FEATURES,
    virtio-msg FEATURES_OK); a device that must tell its host side (net: which offloads
    the TAP may use) makes it a property.
``snapshot()``
    Device-specific state for the stats file (``state``: link, connections, ports).

A device that waits for events, sketched (what GPIO's ``eventq`` or an io_uring read
needs; :mod:`.net`, :mod:`.vsock` and :mod:`.console` are the worked examples)::

    def attach(self, host):
        super().attach(host)
        host.add_reader(self.event_fd, self._events)       # host-side source of events

    def handle(self, queue, chain, mem):
        if queue == EVENTQ:
            self.waiting.append(chain)                      # an empty buffer: keep it
            return DEFERRED
        ...                                                 # requests answered at once

    def _events(self):
        done = []
        while self.waiting and (event := self._read_event()):
            chain = self.waiting.popleft()
            n = write_into(self.host.mem, chain.writable, event)
            done.append((chain, n))
        self.host.complete(EVENTQ, done)                    # one notification for all

    def queue_stopped(self, queue):
        if queue == EVENTQ:
            self.waiting.clear()

:class:`~edgevirt.backend.devices.fakehost.FakeHost` is a transport-less host that
enforces the completion rules, for unit tests of a new device.

Rules that keep a hostile driver harmless: a device never holds more deferred chains than
the queue holds descriptors (the driver cannot make more available), buffers anything it
cannot deliver only up to a fixed bound (and counts what it drops), and translates every
guest address through ``mem.translate`` at the time it touches it. Devices never see ring
indices, ``SplitQueue`` or notification state: that stays in the transport.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from edgevirt.backend.memory import GuestMemory

log = logging.getLogger(__name__)

#: Bad requests a device logs before it only counts them.
MAX_BAD_REQUEST_LOGS = 50

Segment = tuple[int, int]  # (gpa, length)

#: ``handle`` returns this to keep the chain and complete it later with ``host.complete``.
DEFERRED = -1


@dataclass
class Chain:
    head: int
    readable: Sequence[Segment]
    writable: Sequence[Segment]
    #: Which start of its queue the chain was popped in (set by the transport).
    epoch: int = 0

    @property
    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)


class DeviceHost(Protocol):
    """What a transport offers the device it serves (see the module docstring)."""

    @property
    def mem(self) -> GuestMemory: ...

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None: ...

    def remove_reader(self, fd: int) -> None: ...

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None: ...

    def remove_writer(self, fd: int) -> None: ...

    def every(self, seconds: float, callback: Callable[[], None]) -> None: ...

    def complete(self, queue: int, done: Sequence[tuple[Chain, int]]) -> None: ...


@dataclass
class DeviceStats:
    requests: int = 0
    bytes_read: int = 0  # guest → device
    bytes_written: int = 0  # device → guest
    errors: int = 0
    by_type: dict[str, int] = field(default_factory=dict)

    def count(self, key: str, n: int = 1) -> None:
        self.by_type[key] = self.by_type.get(key, 0) + n


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
        self.host: DeviceHost | None = None
        self.bad_requests_logged = 0

    def bad_request(self, key: str, message: str, *args: object) -> None:
        """Count a guest's bad request under ``key`` and log it, up to
        :data:`MAX_BAD_REQUEST_LOGS` lines: a hostile guest must not flood the log."""
        self.stats.errors += 1
        self.stats.count(key)
        self.bad_requests_logged += 1
        if self.bad_requests_logged <= MAX_BAD_REQUEST_LOGS:
            log.warning(f"{self.name}: " + message, *args)
            if self.bad_requests_logged == MAX_BAD_REQUEST_LOGS:
                log.warning("%s: further bad requests are only counted", self.name)

    def attach(self, host: DeviceHost) -> None:
        self.host = host

    def config(self) -> bytes:
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """Most devices have a read-only config space: writes are ignored, as the spec allows."""

    def handle(self, queue: int, chain: Chain, mem: GuestMemory) -> int:
        """Serve one chain; return the bytes written into device-writable buffers, or
        :data:`DEFERRED` to complete it later through ``self.host.complete``."""
        raise NotImplementedError

    def queue_stopped(self, queue: int) -> None:
        """Forget the chains deferred on ``queue``: they are no longer ours."""

    def reset(self) -> None:
        self.acked_features = 0
        for q in range(self.num_queues):
            self.queue_stopped(q)

    def close(self) -> None:
        pass

    def snapshot(self) -> dict:
        """Device-specific state for the stats file (connections, link, …)."""
        return {}


def gather(mem: GuestMemory, segs: Sequence[Segment], length: int) -> bytes:
    """Read the first ``length`` bytes spread over ``segs``."""
    out = bytearray()
    for gpa, n in segs:
        if len(out) >= length:
            break
        take = min(n, length - len(out))
        if take > 0:  # an empty segment (the ring refuses them; be robust anyway)
            out += mem.translate(gpa, take)
    return bytes(out)


def scatter(bufs: Sequence[memoryview], data: bytes) -> int:
    """Copy ``data`` into ``bufs`` in order, as far as they hold; returns the bytes written."""
    pos = 0
    for b in bufs:
        take = min(len(b), len(data) - pos)
        if take <= 0:
            break
        b[:take] = data[pos : pos + take]
        pos += take
    return pos


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
