"""One vhost-user vring: its configuration, its started SplitQueue, and serving it.

A vring starts once it has a size, addresses, a kick fd and guest memory; starting maps its
rings (front-end user addresses → guest-physical, inside the carve-out only), resubmits the
chains a killed predecessor left in the inflight region, then serves whatever the driver
has already made available. A guest fault marks the vring broken (logged, counted, signalled
on the err fd); the process and every other vring keep running.

A blk device with an asynchronous engine (``cache=none``: ``BlkAio``, io_uring or threads)
gets one per vring. With ``threaded`` (the back-end's choice) the engine's C thread serves
the ring by itself from kick to call (``start_thread``); Python only serves the chains the
thread hands back (``wakeup``: get_id, discard, ...) and takes statistics. Without it,
``serve`` submits batches on the loop thread and ``reap`` publishes what finished. Either
way ``stop`` first waits for the I/O in flight and publishes it, so no request outlives the
ring or the memory it points into.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from edgevirt.backend.devices.base import DEFERRED, Chain, VirtioDevice
from edgevirt.backend.devices.blk import BlockDevice
from edgevirt.backend.memory import GuestMemory
from edgevirt.backend.transport.vhost_user.inflight import InflightQueue
from edgevirt.backend.virtq import SERVE_BATCH, SplitQueue
from edgevirt.backend.virtq.pyring import USED_ELEM, walk_chain
from edgevirt.errors import BackendError

log = logging.getLogger(__name__)

#: Chains served per ring call, their used entries published before the next call
#: (SERVE_BATCH says why it is small).
BATCH = SERVE_BATCH
_ONE = struct.pack("<Q", 1)


@dataclass
class VringStats:
    kicks: int = 0
    notifications: int = 0
    served: int = 0
    resubmitted: int = 0
    deferred: int = 0  # chains a device kept to complete later
    stale: int = 0  # completions for an earlier start of the ring, ignored


@dataclass
class Vring:
    index: int
    num: int = 0
    addr: tuple[int, int, int] | None = None  # desc, used, avail as front-end user addresses
    base: int = 0
    kick: int = -1
    call: int = -1
    err: int = -1
    enabled: bool = False
    queue: SplitQueue | None = None
    inflight: InflightQueue | None = None
    broken: str | None = None
    resubmit: list[tuple[int, list[tuple[int, int]], list[tuple[int, int]]]] | None = None
    stats: VringStats = field(default_factory=VringStats)
    #: Bumped whenever the ring stops: chains of an earlier start cannot be completed.
    epoch: int = 0
    #: the blk device's BlkAio engine for this ring (None: synchronous paths)
    aio: Any = None
    #: the device it serves, for the engine's accounting
    blk: BlockDevice | None = None
    #: the engine serves the ring on its own thread (``start_thread``)
    threaded: bool = False

    @property
    def served(self) -> int:
        return self.stats.served

    def close_fds(self) -> None:
        for name in ("kick", "call", "err"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def ready(self) -> bool:
        return (
            self.queue is None
            and self.addr is not None
            and self.kick >= 0
            and self.num > 0
            and self.broken is None
        )

    def start(
        self, mem: GuestMemory, event_idx: bool, inflight: InflightQueue | None
    ) -> SplitQueue:
        """Map the rings; BackendError if they do not lie in guest memory."""
        desc, used, avail = self.addr or (0, 0, 0)
        gdesc = mem.uva_to_gpa(desc, 16 * self.num)
        gavail = mem.uva_to_gpa(avail, 6 + 2 * self.num)
        gused = mem.uva_to_gpa(used, 6 + 8 * self.num)
        q = SplitQueue(self.num, gdesc, gavail, gused, event_idx=event_idx)
        used_idx = int.from_bytes(mem.translate(gused + 2, 2), "little")
        q.used_idx = used_idx
        q.last_avail_idx = self.base
        if inflight is not None and self.num <= inflight.queue_size:
            self.inflight = inflight
            if self.num != inflight.queue_size:
                # The region is sized for the largest queue; track this one's heads in it.
                inflight.queue_size = self.num
            heads = inflight.recover(
                used_idx,
                lambda i: int(
                    USED_ELEM.unpack(mem.translate(gused + 4 + 8 * (i % self.num), 8))[0]
                ),
            )
            # Every chain taken so far is either in the used ring or still in flight.
            q.last_avail_idx = (used_idx + len(heads)) & 0xFFFF
            self.queue = q
            if heads:
                log.info("vring %d: resubmitting %d in-flight chains", self.index, len(heads))
                self._resubmit(heads, mem)
        else:
            self.inflight = None
            self.queue = q
        return q

    def stop(self, mem: GuestMemory | None = None) -> bool:
        """Stop serving; True if the ring was running. ``mem`` (the memory the ring lives
        in) lets the engine's I/O in flight finish and be published first. BackendError if
        the engine's thread had found a guest fault (the ring stops all the same)."""
        try:
            if mem is not None:
                self.pause(mem)
        finally:
            running = self._stop(mem)
        return running

    def _stop(self, mem: GuestMemory | None) -> bool:
        running = self.queue is not None
        if self.queue is not None and mem is not None:
            self.drain(mem)
        if self.queue is not None:
            self.base = self.queue.last_avail_idx
            self.queue = None
            self.epoch += 1  # chains a device deferred can no longer be completed
        self.resubmit = None
        if self.aio is not None:
            self.aio.close()
            self.aio = None
        return running

    # -- the engine's thread ---------------------------------------------------------------

    def start_thread(self, device: VirtioDevice, mem: GuestMemory) -> None:
        """Hand the ring to the engine's thread (chains a predecessor left are served first,
        here, as they are already marked in the inflight region)."""
        q, aio, iq = self.queue, self.aio, self.inflight
        if q is None or aio is None or aio.running or self.broken:
            return
        if self.resubmit:
            chains, self.resubmit = self.resubmit, None
            self._finish(q, mem, device, chains)
        aio.start(q, mem, self.kick, self.call, iq.buf if iq is not None else None,
                  iq.counter if iq is not None else 0)  # fmt: skip

    def pause(self, mem: GuestMemory) -> bool:
        """Take the ring back from the thread (its I/O finished and published); True if it
        ran. BackendError if the thread had stopped on a guest fault."""
        q, aio = self.queue, self.aio
        if q is None or aio is None or not aio.running:
            return False
        try:
            counter = aio.stop(q)
        finally:
            self.sync_stats()
        if self.inflight is not None:
            self.inflight.counter = counter
        rest = aio.take_rest()  # chains it left and Python had not taken yet
        if rest and self.blk is not None:
            self._finish(q, mem, self.blk, rest)
        return True

    def wakeup(self, device: VirtioDevice, mem: GuestMemory) -> None:
        """The thread has chains for the device, or stopped on a guest fault (raised)."""
        aio = self.aio
        if aio is None:
            return
        if not aio.running:  # taken back already: only drain the fd, or the loop spins on it
            aio.take_rest()
            return
        if aio.broken:
            self.pause(mem)  # raises the thread's error
            return
        rest = aio.take_rest()
        try:
            if rest:
                aio.complete([(h, device.handle(self.index, Chain(h, r, w), mem))
                              for h, r, w in rest])  # fmt: skip
        except BackendError:  # a chain nobody can answer: the ring stops here
            self.pause(mem)
            raise
        self.sync_stats()

    def sync_stats(self) -> None:
        """Add what the thread served since the last call to the device and ring stats."""
        if self.aio is None:
            return
        res = self.aio.take_stats()
        if self.blk is not None:
            self.blk.account(res)
        self.stats.served += res.pushed
        self.stats.notifications += res.notified
        self.stats.kicks += res.kicks

    def _finish(self, q: SplitQueue, mem: GuestMemory, device: VirtioDevice,
                chains: list) -> None:  # fmt: skip
        """Serve popped chains with the device and publish them (the loop thread's way)."""
        done = []
        for h, r, w in chains:
            n = device.handle(self.index, Chain(h, r, w, self.epoch), mem)
            if n == DEFERRED:
                self.stats.deferred += 1
            else:
                done.append((h, n))
        if done:
            self._push(q, mem, done)

    # -- the engine on the loop thread -------------------------------------------------------

    def reap(self, mem: GuestMemory, wait: bool = False) -> None:
        """Publish the engine's finished requests (all in flight with ``wait``)."""
        q, aio = self.queue, self.aio
        if q is None or aio is None:
            return
        res = aio.reap(q, self.inflight.buf if self.inflight is not None else None, wait,
                       self.call)  # fmt: skip
        if self.blk is not None:
            self.blk.account(res)
        self.stats.served += res.pushed
        self.stats.notifications += res.notified

    def drain(self, mem: GuestMemory) -> None:
        """Wait for the engine's I/O in flight and publish it (the ring is still mapped)."""
        if self.aio is None or self.queue is None or not self.aio.in_flight:
            return
        try:
            self.reap(mem, wait=True)
        except OSError as e:  # the call fd is gone: the requests are published all the same
            log.error("vring %d: drain: %s", self.index, e)

    def _resubmit(self, heads: list[int], mem: GuestMemory) -> None:
        q = self.queue
        assert q is not None
        chains = [walk_chain(mem, q.size, q.desc, h) for h in heads]
        self.stats.resubmitted += len(chains)
        self.resubmit = chains

    def serve(self, device: VirtioDevice, mem: GuestMemory, fastpath: bool = False) -> None:
        """Serve available chains until none is left; BackendError on a guest fault.

        With ``fastpath``, a file-backed blk device on the C ring is served by
        ``SplitQueue.serve_blk`` (the request path in C); a batch it cannot finish comes
        back as popped chains and is finished here exactly as without it.
        """
        q = self.queue
        assert q is not None
        iq = self.inflight
        if self.aio is not None and self.blk is not None:
            if self.threaded:
                self.start_thread(device, mem)
            else:
                self._serve_aio(q, device, mem)
            return
        serve_blk = getattr(q, "serve_blk", None) if fastpath else None
        blk = device if isinstance(device, BlockDevice) and serve_blk is not None else None
        fast = blk.fast_path_args() if blk is not None else None
        while True:
            done: list[tuple[int, int]] = []
            if self.resubmit:  # taken by a predecessor: already marked in the region
                chains, self.resubmit = self.resubmit, None
            elif blk is not None and fast is not None and serve_blk is not None:
                # notify: the call also decides the driver's notification and re-reads the
                # avail idx (res.pending), which saves two ring calls per kick.
                res = serve_blk(mem, *fast, BATCH,
                                iq.buf if iq is not None else None,
                                iq.counter if iq is not None else 0,
                                blk.fallback_fd, notify=True)  # fmt: skip
                if iq is not None:
                    iq.counter = res.counter  # every chain popped is marked taken
                blk.account(res)
                if res.pushed:
                    self.stats.served += res.pushed
                    if res.notified:
                        self._signal()
                if not res.rest:  # all served (or nothing there): serve again only if
                    if res.pending:  # the driver added chains meanwhile
                        continue
                    return
                done, chains = list(res.done), res.rest
            else:
                chains = q.pop(mem, BATCH)
                if not chains:
                    return
                if iq is not None:
                    for head, _r, _w in chains:
                        iq.taken(head)
            for head, readable, writable in chains:
                n = device.handle(self.index, Chain(head, readable, writable, self.epoch), mem)
                if n == DEFERRED:
                    self.stats.deferred += 1
                else:
                    done.append((head, n))
            if done:
                self._push(q, mem, done)

    def complete(self, mem: GuestMemory, done: Sequence[tuple[Chain, int]]) -> None:
        """Publish chains a device deferred (the one completion path); BackendError on a
        guest fault. Chains of an earlier start of the ring are ignored and counted."""
        q = self.queue
        current = [(c.head, n) for c, n in done if c.epoch == self.epoch]
        if q is None or self.broken:
            self.stats.stale += len(done)
            return
        self.stats.stale += len(done) - len(current)
        if current:
            self._push(q, mem, current)

    def _push(self, q: SplitQueue, mem: GuestMemory, done: list[tuple[int, int]]) -> None:
        iq = self.inflight
        if iq is not None:
            iq.before_push(done[-1][0])
        q.push(mem, done)
        if iq is not None:
            iq.completed([h for h, _ in done], q.used_idx)
        self.stats.served += len(done)
        self._notify(q, mem)

    def _serve_aio(self, q: SplitQueue, device: VirtioDevice, mem: GuestMemory) -> None:
        """Submit every available chain to the engine; other chains go to ``device.handle``."""
        iq, aio, blk = self.inflight, self.aio, self.blk
        assert aio is not None and blk is not None
        while True:
            if self.resubmit:  # taken by a predecessor: already marked in the region
                rest, self.resubmit = self.resubmit, None
            else:
                before = q.last_avail_idx
                res = aio.submit(q, mem, BATCH,
                                 iq.buf if iq is not None else None,
                                 iq.counter if iq is not None else 0)  # fmt: skip
                if iq is not None:
                    iq.counter = res.counter
                blk.account(res)
                if res.pushed:
                    self.stats.served += res.pushed
                    self._notify(q, mem)
                popped = (q.last_avail_idx - before) & 0xFFFF
                if popped == 0:
                    return
                rest = res.rest
                # A short batch took all there was; without EVENT_IDX the driver kicks for
                # anything newer (with it, the pop again covers a kick it may have skipped).
                if popped < BATCH and not q.event_idx and not rest:
                    return
            if rest:
                self._finish(q, mem, device, rest)

    def _notify(self, q: SplitQueue, mem: GuestMemory) -> None:
        if q.should_notify(mem):
            self._signal()

    def _signal(self) -> None:
        if self.call >= 0:
            self.stats.notifications += 1  # counted first: observers wake on the call
            os.write(self.call, _ONE)

    def signal_err(self) -> None:
        if self.err >= 0:
            try:
                os.write(self.err, _ONE)
            except OSError:
                pass

    def snapshot(self) -> dict:
        q = self.queue
        return {
            "index": self.index,
            "size": self.num,
            "enabled": self.enabled,
            "started": q is not None,
            "last_avail_idx": q.last_avail_idx if q is not None else self.base,
            "used_idx": q.used_idx if q is not None else None,
            "served": self.stats.served,
            "kicks": self.stats.kicks,
            "notifications": self.stats.notifications,
            "resubmitted": self.stats.resubmitted,
            "deferred": self.stats.deferred,
            "stale": self.stats.stale,
            "inflight_tracking": self.inflight is not None,
            "io": self.aio.engine if self.aio is not None else None,
            "io_thread": self.aio is not None and self.aio.running,
            "in_flight_io": self.aio.in_flight if self.aio is not None else 0,
            "broken": self.broken,
        }
