"""One virtio device behind the virtio-msg bus: the transport messages' device side.

A :class:`MsgDevice` wraps an unchanged :class:`~edgevirt.backend.devices.VirtioDevice`
(the same classes vhost-user serves) and answers the transport messages for its device
number: device info, feature blocks, config space with a generation count, device status,
virtqueues. Chains are served from rings in guest memory (the carve-out) through the same
``SplitQueue`` as vhost-user, and a file-backed blk device through the same C request paths:
``SplitQueue.serve_blk`` (a whole batch per GIL-free call) for the page cache, and with
``cache=none`` the same asynchronous engine (``BlkAio``: io_uring or the thread pool, one per
queue) that vhost-user uses, submitted on EVENT_AVAIL and reaped when its eventfd fires (the
EVENT_USED then goes out), so the transport costs only its messages.

A well-formed request always gets a response, even when its content is refused: a
GET_CONFIG outside the config space answers with zero bytes, a SET_CONFIG with a stale
generation or bad range is rejected with size 0 (as the draft says), a feature set the
device never offered makes FEATURES_OK not stick, a virtqueue outside the carve-out marks
that queue broken and sets DEVICE_NEEDS_RESET. The driver can therefore always tell what
happened, and nothing it sends can make the back-end touch memory outside the carve-out.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from edgevirt.backend.devices.base import DEFERRED, Chain, VirtioDevice
from edgevirt.backend.devices.blk import BlockDevice
from edgevirt.backend.loop import Loop
from edgevirt.backend.memory import GuestMemory
from edgevirt.backend.transport.virtio_msg import protocol as p
from edgevirt.backend.transport.virtio_msg.protocol import Message, MsgId
from edgevirt.backend.virtq import BlkAio, SplitQueue
from edgevirt.errors import BackendError

log = logging.getLogger(__name__)

F_INDIRECT_DESC = 28
F_EVENT_IDX = 29
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33
#: Feature bits the transport reports: 64 (two blocks) covers everything offered here.
NUM_FEATURE_BITS = 64
#: ASCII "EDGE": the vendor ID in GET_DEVICE_INFO (virtio-mmio's VendorID equivalent).
VENDOR_ID = 0x45474445
MAX_QUEUE_SIZE = 256
#: Feature blocks one answer can carry (8-byte header, 8 bytes of fields, 4 per block).
MAX_FEATURE_BLOCKS = (p.MAX_MSG_SIZE - p.HEADER.size - 8) // 4
#: Chains per ring call; a queue serves SERVE_BUDGET of them (the C path: up to one batch
#: more) before other queues get a turn.
BATCH = 64
SERVE_BUDGET = 256


@dataclass
class VQueue:
    index: int
    size: int = 0
    desc: int = 0
    driver: int = 0
    device: int = 0
    queue: SplitQueue | None = None
    broken: str | None = None
    served: int = 0
    deferred: int = 0
    stale: int = 0
    #: Bumped whenever the queue stops: chains of an earlier start cannot be completed.
    epoch: int = 0
    #: The blk device's asynchronous engine for this queue (cache=none), else None.
    aio: Any = None
    #: The name of the engine the queue last ran on (kept after it stops, for the stats).
    engine: str | None = None
    #: A file-backed blk queue without an engine: ``serve_blk`` with every argument bound
    #: (a batch of BATCH chains), built when the queue is set up.
    sync: functools.partial | None = None

    def clear(self) -> bool:
        """Forget the queue; True if it was set up (its device drops deferred chains)."""
        was = self.queue is not None
        self.size = self.desc = self.driver = self.device = 0
        self.queue = None
        self.sync = None
        self.epoch += 1
        return was


class MsgDevice:
    """Also the device's :class:`~edgevirt.backend.devices.base.DeviceHost`: ``loop`` runs
    its fds, ``on_used(dev_num, queue)`` tells the bus that deferred completions want an
    EVENT_USED."""

    def __init__(
        self,
        dev_num: int,
        device: VirtioDevice,
        mem: GuestMemory,
        loop: Loop | None = None,
        on_used: Callable[[int, int], None] | None = None,
    ) -> None:
        self.dev_num = dev_num
        self.device = device
        self.mem = mem
        self.loop = loop
        self.on_used = on_used
        self.status = 0
        self.driver_features = 0
        self.generation = 0
        self._config = device.config()
        self.vqs = [VQueue(i) for i in range(device.num_queues)]
        self.broken: list[str] = []
        device.attach(self)

    # -- the device's host (DeviceHost: devices/base.py) -------------------------------

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        if self.loop is None:
            raise BackendError(f"{self.name}: no event loop to watch fd {fd}")
        self.loop.add_reader(fd, callback)

    def remove_reader(self, fd: int) -> None:
        if self.loop is not None:
            self.loop.remove_reader(fd)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        if self.loop is None:
            raise BackendError(f"{self.name}: no event loop to watch fd {fd}")
        self.loop.add_writer(fd, callback)

    def remove_writer(self, fd: int) -> None:
        if self.loop is not None:
            self.loop.remove_writer(fd)

    def every(self, seconds: float, callback: Callable[[], None]) -> None:
        if self.loop is None:
            raise BackendError(f"{self.name}: no event loop for a timer")
        self.loop.every(seconds, callback)

    def complete(self, queue: int, done: Sequence[tuple[Chain, int]]) -> None:
        """Publish chains the device deferred; a guest fault breaks that queue only."""
        if not 0 <= queue < len(self.vqs):
            raise BackendError(f"{self.name}: complete() on queue {queue}, has {len(self.vqs)}")
        vq = self.vqs[queue]
        q = vq.queue
        current = [(c.head, n) for c, n in done if c.epoch == vq.epoch]
        if q is None or vq.broken:
            vq.stale += len(done)
            return
        vq.stale += len(done) - len(current)
        if not current:
            return
        try:
            q.push(self.mem, current)
            vq.served += len(current)
            notify = q.should_notify(self.mem)
        except BackendError as e:
            self._break(vq, f"queue {queue}: {e}")
            return
        if notify and self.on_used is not None:
            self.on_used(self.dev_num, queue)

    def _stop(self, vq: VQueue) -> None:
        self._close_aio(vq)
        if vq.clear():
            self.device.queue_stopped(vq.index)

    def close(self) -> None:
        """Finish the I/O in flight (it holds guest memory) and close the device."""
        for vq in self.vqs:
            self._close_aio(vq)
        self.device.close()

    # -- the asynchronous blk engine (cache=none) ---------------------------------------------

    def _open_aio(self, vq: VQueue) -> None:
        blk = self.device
        if not (isinstance(blk, BlockDevice) and BlkAio is not None and self.loop is not None
                and vq.queue is not None and hasattr(vq.queue, "serve_blk")):  # fmt: skip
            return
        try:
            vq.aio = blk.open_aio(vq.size, BlkAio)
        except OSError as e:  # no engine: the synchronous C path serves the queue
            log.error("%s: queue %d: asynchronous I/O unavailable (%s)", self.name, vq.index, e)
        if vq.aio is not None:
            vq.engine = vq.aio.engine
            self.loop.add_reader(vq.aio.eventfd, lambda: self._reap(vq))
            log.info("%s: queue %d: %s engine (%s)", self.name, vq.index, vq.aio.engine,
                     vq.aio.reason)  # fmt: skip

    def _close_aio(self, vq: VQueue) -> None:
        """Wait for the engine's I/O in flight, publish it while the ring is still ours."""
        aio, vq.aio = vq.aio, None
        if aio is None:
            return
        if self.loop is not None:
            self.loop.remove_reader(aio.eventfd)
        try:
            if vq.queue is not None and aio.in_flight:
                self._account(vq, aio.reap(vq.queue, None, True))
        except BackendError as e:
            log.error("%s: queue %d: drain: %s", self.name, vq.index, e)
        finally:
            aio.close()

    def _account(self, vq: VQueue, res: Any) -> None:
        assert isinstance(self.device, BlockDevice)
        self.device.account(res)
        vq.served += res.pushed

    def _reap(self, vq: VQueue) -> None:
        """The engine finished I/O: publish it, then EVENT_USED if the driver wants one."""
        q, aio = vq.queue, vq.aio
        if q is None or aio is None:
            return
        try:
            res = aio.reap(q)
            self._account(vq, res)
            notify = bool(res.pushed) and q.should_notify(self.mem)
        except BackendError as e:
            self._break(vq, f"queue {vq.index}: {e}")
            return
        if notify and self.on_used is not None:
            self.on_used(self.dev_num, vq.index)

    def _submit(self, vq: VQueue, q: SplitQueue, budget: int) -> tuple[int, bool, list]:
        """One batch to the engine: (chains popped, notify, chains for the device)."""
        before = q.last_avail_idx
        res = vq.aio.submit(q, self.mem, min(BATCH, budget))
        self._account(vq, res)
        notify = bool(res.pushed) and q.should_notify(self.mem)
        return (q.last_avail_idx - before) & 0xFFFF, notify, res.rest

    @property
    def offered_features(self) -> int:
        return (
            self.device.features
            | 1 << F_VERSION_1
            | 1 << F_ACCESS_PLATFORM  # the guest must use the DMA API, hence the carve-out
            | 1 << F_INDIRECT_DESC
            | 1 << F_EVENT_IDX
        )

    @property
    def name(self) -> str:
        return f"{self.device.name}@{self.dev_num}"

    def reset(self) -> None:
        for vq in self.vqs:
            self._stop(vq)
            vq.broken = None
        self.status = 0
        self.driver_features = 0
        self.device.reset()

    def _config_now(self) -> bytes:
        """The config space; a change since the driver last looked bumps the generation."""
        cfg = self.device.config()
        if cfg != self._config:
            self._config = cfg
            self.generation = (self.generation + 1) & 0xFFFFFFFF
        return cfg

    def _break(self, vq: VQueue, why: str) -> None:
        vq.broken = why
        self._stop(vq)
        self.status |= p.STATUS_DEVICE_NEEDS_RESET
        msg = f"{self.name}: {why}"
        self.broken.append(msg)
        log.error(
            "%s (queue marked broken, DEVICE_NEEDS_RESET set; other devices keep running)", msg
        )

    # -- messages -------------------------------------------------------------------------

    def handle(self, msg: Message) -> Message | None:  # noqa: C901 - one branch per message
        """Answer one transport request (None for events). Raises VirtioMsgError for a
        message the device side must not receive (which the bus discards and logs)."""
        m = msg.msg_id
        if m == MsgId.GET_DEVICE_INFO:
            return p.respond(
                msg,
                device_id=self.device.device_id,
                vendor_id=VENDOR_ID,
                num_feature_bits=NUM_FEATURE_BITS,
                config_size=len(self._config_now()),
                max_virtqueues=len(self.vqs),
                admin_vq_start=0,
                admin_vq_count=0,
            )
        if m == MsgId.GET_DEVICE_FEATURES:
            index, count = msg["index"], msg["num_blocks"]
            if count > MAX_FEATURE_BLOCKS:
                raise p.VirtioMsgError(
                    f"{self.name}: GET_DEVICE_FEATURES of {count} blocks, an answer holds "
                    f"at most {MAX_FEATURE_BLOCKS}"
                )
            words = p.features_to_words(self.offered_features, index, count)
            return p.respond(msg, words, index=index, num_blocks=count)
        if m == MsgId.SET_DRIVER_FEATURES:
            index, count = msg["index"], msg["num_blocks"]
            if self.status & p.STATUS_FEATURES_OK:
                log.warning("%s: SET_DRIVER_FEATURES after FEATURES_OK ignored", self.name)
            elif index + count <= NUM_FEATURE_BITS // 32:
                mask = ((1 << (32 * count)) - 1) << (32 * index)
                value = p.words_to_features(msg.data, index)
                self.driver_features = (self.driver_features & ~mask) | value
            elif any(msg.data):
                # Bits beyond what we have can never be accepted: remember them so that
                # FEATURES_OK does not stick.
                self.driver_features |= 1 << NUM_FEATURE_BITS
            return p.respond(msg)
        if m == MsgId.GET_CONFIG:
            cfg = self._config_now()
            off, size = msg["offset"], msg["size"]
            limit = p.MAX_MSG_SIZE - p.HEADER.size - 12
            if off > len(cfg) or size > len(cfg) - off or size > limit:
                log.warning(
                    "%s: GET_CONFIG offset %d size %d outside config space of %d bytes",
                    self.name,
                    off,
                    size,
                    len(cfg),
                )
                size = 0
            return p.respond(
                msg, cfg[off : off + size], generation=self.generation, offset=off, size=size
            )
        if m == MsgId.SET_CONFIG:
            cfg = self._config_now()
            off, size = msg["offset"], msg["size"]
            if msg["generation"] != self.generation or off > len(cfg) or size > len(cfg) - off:
                log.warning(
                    "%s: SET_CONFIG generation %d offset %d size %d rejected (generation %d, "
                    "config space %d bytes)",
                    self.name,
                    msg["generation"],
                    off,
                    size,
                    self.generation,
                    len(cfg),
                )
                return p.respond(msg, generation=self.generation, offset=off, size=0)
            self.device.write_config(off, msg.data)
            cfg = self._config_now()
            return p.respond(
                msg, cfg[off : off + size], generation=self.generation, offset=off, size=size
            )
        if m == MsgId.GET_DEVICE_STATUS:
            return p.respond(msg, status=self.status)
        if m == MsgId.SET_DEVICE_STATUS:
            self._set_status(msg["status"])
            return p.respond(msg, status=self.status)
        if m == MsgId.GET_VQUEUE:
            index = msg["index"]
            if index >= len(self.vqs):
                return p.respond(msg, index=index, max_size=0, size=0, desc=0, driver=0, device=0)
            vq = self.vqs[index]
            return p.respond(
                msg,
                index=index,
                max_size=MAX_QUEUE_SIZE,
                size=vq.size,
                desc=vq.desc,
                driver=vq.driver,
                device=vq.device,
            )
        if m == MsgId.SET_VQUEUE:
            self._set_vqueue(msg)
            return p.respond(msg)
        if m == MsgId.RESET_VQUEUE:
            if msg["index"] < len(self.vqs):
                vq = self.vqs[msg["index"]]
                self._stop(vq)
                vq.broken = None
            return p.respond(msg)
        if m == MsgId.GET_SHM:
            return p.respond(msg, index=msg["index"], length=0, address=0)  # none: length 0
        if m == MsgId.EVENT_AVAIL:
            return None  # the bus serves the queue: see serve()
        raise p.VirtioMsgError(f"{self.name}: {msg.describe()} is not for the device side")

    def _set_status(self, status: int) -> None:
        if status == 0:
            log.info("%s: reset by the driver", self.name)
            self.reset()
            return
        if status & ~self.status & p.STATUS_FEATURES_OK:
            extra = self.driver_features & ~self.offered_features
            if extra or not self.driver_features >> F_VERSION_1 & 1:
                log.error(
                    "%s: FEATURES_OK refused: driver features %#x (%s)",
                    self.name,
                    self.driver_features,
                    f"bits {extra:#x} never offered" if extra else "VERSION_1 not set",
                )
                status &= ~p.STATUS_FEATURES_OK
            else:
                self.device.acked_features = self.driver_features
        # DEVICE_NEEDS_RESET is ours to set; the driver cannot clear it except by reset.
        self.status = status | (self.status & p.STATUS_DEVICE_NEEDS_RESET)
        if status & p.STATUS_DRIVER_OK:
            log.info(
                "%s: DRIVER_OK, features %#x, queues %s",
                self.name,
                self.driver_features,
                [vq.size for vq in self.vqs],
            )

    def _set_vqueue(self, msg: Message) -> None:
        index = msg["index"]
        if index >= len(self.vqs):
            log.error("%s: SET_VQUEUE for queue %d, device has %d", self.name, index, len(self.vqs))
            return
        vq = self.vqs[index]
        size, desc, driver, device = msg["size"], msg["desc"], msg["driver"], msg["device"]
        where = (
            f"queue {index} (size {size}, desc {desc:#x}, driver {driver:#x}, device {device:#x})"
        )
        if vq.queue is not None and self.status & p.STATUS_DRIVER_OK:
            log.error("%s: SET_VQUEUE on live %s refused; reset it first", self.name, where)
            return
        self._stop(vq)
        vq.broken = None
        if not (1 <= size <= MAX_QUEUE_SIZE and size & (size - 1) == 0):
            self._break(vq, f"{where}: size is not a power of two in 1..{MAX_QUEUE_SIZE}")
            return
        try:
            # Every area must lie in the carve-out: the ring code checks again on each access.
            self.mem.translate(desc, 16 * size)
            self.mem.translate(driver, 6 + 2 * size)
            self.mem.translate(device, 6 + 8 * size)
            event_idx = bool(self.driver_features >> F_EVENT_IDX & 1)
            queue = SplitQueue(size, desc, driver, device, event_idx=event_idx)
        except BackendError as e:  # outside the carve-out, or misaligned (RingError)
            self._break(vq, f"{where}: {e}")
            return
        vq.size, vq.desc, vq.driver, vq.device, vq.queue = size, desc, driver, device, queue
        self._open_aio(vq)
        vq.sync = self._sync(queue) if vq.aio is None else None

    # -- virtqueues -----------------------------------------------------------------------

    def _sync(self, q: SplitQueue) -> functools.partial | None:
        """``serve_blk`` of a file-backed blk device with every argument bound, else None
        (the device's own handler serves the queue's chains)."""
        blk = self.device
        serve_blk = getattr(q, "serve_blk", None)  # the C ring only
        if serve_blk is None or not isinstance(blk, BlockDevice):
            return None
        fast = blk.sync_args()
        if fast is None:
            return None
        return functools.partial(
            serve_blk, self.mem, *fast, BATCH, None, 0, blk.fallback_fd, notify=True
        )

    def serve(self, index: int) -> tuple[bool, bool]:
        """Serve queue ``index``: returns (the driver should be notified, work is left)."""
        if index >= len(self.vqs):
            raise p.VirtioMsgError(
                f"{self.name}: EVENT_AVAIL for queue {index}, has {len(self.vqs)}"
            )
        vq = self.vqs[index]
        q = vq.queue
        if q is None or vq.broken or not self.status & p.STATUS_DRIVER_OK:
            return False, False
        notify = False
        budget = SERVE_BUDGET
        sync, blk = vq.sync, self.device
        try:
            while budget > 0:
                done: list[tuple[int, int]] = []
                if vq.aio is not None:  # cache=none: completions come back through _reap
                    popped, pushed, chains = self._submit(vq, q, budget)
                    notify |= pushed
                    budget -= popped - len(chains)
                    if popped and not chains:
                        continue
                elif sync is not None and isinstance(blk, BlockDevice):
                    # notify: the call also decides the notification and re-reads the avail
                    # idx after a full fence (res.pending), as set_notification + pending do.
                    res = sync()  # BATCH chains: the budget may be overshot by one batch
                    blk.account(res)
                    vq.served += res.pushed
                    budget -= res.pushed
                    notify |= bool(res.notified)
                    if not res.rest:
                        if res.pending:
                            continue
                        break
                    done, chains = list(res.done), res.rest
                else:
                    chains = q.pop(self.mem, min(BATCH, budget))
                if not chains and not done:
                    # Full fence inside: orders our earlier stores (used idx, the message
                    # ring's consumer index) before re-reading avail idx.
                    q.set_notification(self.mem, True)
                    if not q.pending(self.mem):
                        break
                    continue
                taken = len(done) + len(chains)
                for head, readable, writable in chains:
                    chain = Chain(head, readable, writable, vq.epoch)
                    n = self.device.handle(index, chain, self.mem)
                    if n == DEFERRED:
                        vq.deferred += 1
                    else:
                        done.append((head, n))
                budget -= taken
                if vq.queue is not q:  # the device broke or reset the queue meanwhile
                    return notify, False
                if done:
                    q.push(self.mem, done)
                    vq.served += len(done)
                    notify |= q.should_notify(self.mem)
        except BackendError as e:
            self._break(vq, f"queue {index}: {e}")
            return notify, False
        return notify, budget <= 0

    def snapshot(self) -> dict:
        d = self.device
        return {
            "device": d.name,
            "dev_num": self.dev_num,
            "status": self.status,
            "features": self.driver_features,
            "generation": self.generation,
            "broken": list(self.broken),
            "requests": d.stats.requests,
            "bytes_read": d.stats.bytes_read,
            "bytes_written": d.stats.bytes_written,
            "errors": d.stats.errors,
            "by_type": dict(d.stats.by_type),
            "queues": [
                {
                    "index": v.index,
                    "size": v.size,
                    "served": v.served,
                    "broken": v.broken,
                    "deferred": v.deferred,
                    "stale": v.stale,
                    "io": v.engine,
                    "in_flight_io": v.aio.in_flight if v.aio is not None else 0,
                }
                for v in self.vqs
            ],
            **({"state": d.snapshot()} if d.snapshot() else {}),
        }
