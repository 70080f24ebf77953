"""The device side of a virtio-msg bus over ivshmem: message memory, doorbells, dispatch.

The bus owns the message memory (a memfd it lays out, see :mod:`.channel`), serves it to
one driver peer through the ivshmem server protocol (:mod:`.ivshmem`), and dispatches each
transport message to the :class:`~.device.MsgDevice` for its ``dev_num``, which wraps the
same device classes vhost-user serves. Device numbers are the index in the device list.

Doorbells: the driver rings our vector 0 after publishing messages; we ring its vector 0
after publishing responses or events. Without doorbells (no server, or a driver that cannot
ring) the bus polls every ``poll_interval`` seconds. With doorbells a slow backstop poll
still runs: it catches a wake-up lost to the one store->load reordering Python cannot
fence (see :mod:`.channel`) and continues work cut short by the per-round budget.

Notifications are coalesced so the rings can never overflow with them: an EVENT_USED for a
queue is not sent again while the previous one is still unconsumed (the guest module does
the same with EVENT_AVAIL). Full fences order each check (the C ring's
``should_notify``/``set_notification``).

Restart (peer mode): the message memory outlives the device side, so a restarted bus finds
its own layout, adopts it, drops what the driver had sent its predecessor, bumps the
header's epoch and rings the driver once; the driver then resets and re-probes each device
(PROTOCOL.md, "Restart"). The devices start from a clean state; what they store (a disk
file) is untouched.

Everything the driver sends is hostile: a malformed message is discarded and counted (the
draft: "SHOULD be discarded ... SHOULD NOT generate further protocol traffic"), a broken ring
index stops that ring until the driver reconnects, and no exception a message can cause
escapes to the event loop.
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from edgevirt.backend.devices.base import VirtioDevice
from edgevirt.backend.loop import Loop
from edgevirt.backend.memory import GuestMemory
from edgevirt.backend.transport.virtio_msg import protocol as p
from edgevirt.backend.transport.virtio_msg.channel import (
    DEFAULT_SIZE,
    DEFAULT_SLOTS,
    MessageMemory,
    pad,
)
from edgevirt.backend.transport.virtio_msg.device import MsgDevice
from edgevirt.backend.transport.virtio_msg.ivshmem import Client, IvshmemServer, drain
from edgevirt.backend.transport.virtio_msg.pcilink import PeerLink
from edgevirt.backend.transport.virtio_msg.protocol import BusMsgId, Message, MsgId, VirtioMsgError

log = logging.getLogger(__name__)

#: Our ivshmem peer ID (written into the message memory header for the driver to ring).
DEVICE_PEER = 0
VECTORS = 2
VECTOR_MESSAGES = 0  # both directions: "messages are waiting in your ring"
BACKSTOP = 0.05
POLL_FALLBACK = 0.002  # peer mode without doorbells
ROUNDS = 16  # round-robin passes over pending queues per poll


@dataclass
class BusStats:
    messages_in: int = 0
    messages_out: int = 0
    doorbells_in: int = 0
    doorbells_out: int = 0
    dropped: int = 0  # to-driver ring full
    coalesced: int = 0  # EVENT_USED not sent: the previous one is still unconsumed
    protocol_errors: int = 0
    polls: int = 0
    errors: list[str] = field(default_factory=list)  # the first few, for the stats file

    def error(self, text: str) -> None:
        self.protocol_errors += 1
        if len(self.errors) < 20:
            self.errors.append(text)


class MsgBus:
    def __init__(
        self,
        devices: Sequence[VirtioDevice],
        mem: GuestMemory,
        loop: Loop,
        *,
        socket_path: str | None = None,
        size: int = DEFAULT_SIZE,
        nslots: int = DEFAULT_SLOTS,
        vectors: int = VECTORS,
        poll_interval: float | None = None,
        link: PeerLink | None = None,
    ) -> None:
        self.mem = mem
        self.loop = loop
        self.stats = BusStats()
        self.devices = {
            n: MsgDevice(n, d, mem, loop, self._deferred_used) for n, d in enumerate(devices)
        }
        self.server: IvshmemServer | None = None
        self.link = link
        self.adopted = False
        self._work: dict[tuple[int, int], None] = {}  # queues to serve, in arrival order
        #: Every (dev_num, queue) an EVENT_AVAIL may name.
        self._queues = {(n, i) for n, d in self.devices.items() for i in range(len(d.vqs))}
        self._used_pos: dict[tuple[int, int], int] = {}  # last EVENT_USED's ring position
        self._used_raw: dict[tuple[int, int], bytes] = {}  # each queue's EVENT_USED, encoded
        self._kick = False
        if link is not None:  # peer mode: memory and doorbells belong to a PCI device
            self.shm_fd = -1
            self._open = True
            self.msgmem, self.adopted = MessageMemory.adopt_or_create(
                link.buffer, nslots, link.own_id
            )
            if self.adopted:
                log.info(
                    "restart: adopted the message memory, epoch %d, %d stale to-device "
                    "messages skipped; ringing the driver to reset its devices",
                    self.msgmem.epoch, self.msgmem.skipped,
                )  # fmt: skip
            for fd in link.fds():
                loop.add_reader(fd, functools.partial(self._link_doorbell, fd))
            interval = poll_interval or (BACKSTOP if link.fds() else POLL_FALLBACK)
            loop.every(interval, self.poll)
            # Hello: a driver attached to an earlier epoch learns of this one now.
            if link.notify():
                self.stats.doorbells_out += 1
            return
        self.shm_fd = os.memfd_create("edgevirt-virtio-msg", os.MFD_CLOEXEC)
        self._open = True
        try:
            os.ftruncate(self.shm_fd, size)
            self._map = mmap.mmap(self.shm_fd, size, mmap.MAP_SHARED)
            self.msgmem = MessageMemory.create(memoryview(self._map), nslots, DEVICE_PEER)
            if socket_path is not None:
                self.server = IvshmemServer(
                    socket_path,
                    self.shm_fd,
                    vectors,
                    own_id=DEVICE_PEER,
                    on_connect=self._connected,
                    on_disconnect=self._disconnected,
                )
        except BaseException:
            os.close(self.shm_fd)
            raise
        if self.server is not None:
            loop.add_reader(self.server.listener.fileno(), self._accept)
            for fd in self.server.own_eventfds:
                loop.add_reader(fd, functools.partial(self._doorbell, fd))
        loop.every(poll_interval or BACKSTOP, self.poll)

    # -- peer lifetime --------------------------------------------------------------------

    def _accept(self) -> None:
        assert self.server is not None
        self.server.accept()

    def _connected(self, client: Client) -> None:
        self.loop.add_reader(client.sock.fileno(), self._client_readable)

    def _client_readable(self) -> None:
        assert self.server is not None
        self.server.client_readable()

    def _disconnected(self, client: Client) -> None:
        """The driver is gone: forget its devices' state and start the rings afresh."""
        self.loop.remove_reader(client.sock.fileno())
        for dev in self.devices.values():
            dev.reset()
        self.msgmem.reset()
        self._work.clear()
        self._used_pos.clear()

    def close(self) -> None:
        if self.link is not None:
            for fd in self.link.fds():
                self.loop.remove_reader(fd)
            if self._open:
                self.msgmem.close()
            self.link.close()
            self.link = None
            self._open = False
        if self.server is not None:
            self.loop.remove_reader(self.server.listener.fileno())
            for fd in self.server.own_eventfds:
                self.loop.remove_reader(fd)
            self.server.close()
            self.server = None
        if self.shm_fd >= 0:
            self.msgmem.close()
            self._map.close()
            os.close(self.shm_fd)
            self.shm_fd = -1
            self._open = False
        for dev in self.devices.values():
            dev.close()

    # -- the work loop --------------------------------------------------------------------

    def _doorbell(self, fd: int) -> None:
        self.stats.doorbells_in += drain(fd)
        self.rung()

    def _link_doorbell(self, fd: int) -> None:
        if self.link is not None:
            self.stats.doorbells_in += self.link.drain(fd)
        self.rung()

    def rung(self) -> None:
        """What the driver's doorbell makes the bus do."""
        if not self._one_avail():
            self.poll()

    def _one_avail(self) -> bool:
        """The data path's usual doorbell: one request in flight, so one EVENT_AVAIL for an
        existing queue waits and nothing else does. Served here with fewer steps than
        :meth:`poll` (the same checks and outcome); False, touching nothing, for anything
        else, which :meth:`poll` then handles (errors included)."""
        if self._work or not self._open:
            return False
        ring = self.msgmem.to_device
        try:
            off = ring.single()
        except VirtioMsgError:
            return False  # poll() meets it again and reports it
        if off is None:
            return False
        key = p.event_avail_at(ring.buffer, off)  # copied out, then checked
        if key not in self._queues:
            return False
        ring.advance()
        self.stats.polls += 1
        self.stats.messages_in += 1
        self._work[key] = None
        self._serve(key)  # takes the key out again unless the queue had more than its budget
        if self._work:
            self.poll()  # the rest now, as poll() itself would go round again
        else:
            self._ring_driver()
        return True

    def poll(self) -> None:
        """Drain the to-device ring, serve the queues it named, notify the driver once."""
        if not self._open:
            return
        self.stats.polls += 1
        ring = self.msgmem.to_device
        try:
            for _ in range(2 * ring.nslots):
                raw = ring.get()
                if raw is None:
                    break
                self.stats.messages_in += 1
                self._dispatch(raw)
        except VirtioMsgError as e:
            self._ring_broken(e)
        for _ in range(ROUNDS):
            if not self._work:
                break
            for key in list(self._work):
                self._serve(key)
        self._ring_driver()

    def _ring_driver(self) -> None:
        if self._kick:
            self._kick = False
            if self.server is not None and self.server.interrupt(VECTOR_MESSAGES):
                self.stats.doorbells_out += 1
            elif self.link is not None and self.link.notify():
                self.stats.doorbells_out += 1

    def _ring_broken(self, e: VirtioMsgError) -> None:
        if str(e) not in self.stats.errors:
            log.error("%s; ring stopped until the driver reconnects", e)
            self.stats.error(str(e))

    def _serve(self, key: tuple[int, int]) -> None:
        dev_num, index = key
        try:
            notify, more = self.devices[dev_num].serve(index)
        except VirtioMsgError as e:
            self.stats.error(str(e))
            log.warning("%s", e)
            notify, more = False, False
        if not more:
            self._work.pop(key, None)
        if notify:
            self._event_used(key)

    def _deferred_used(self, dev_num: int, index: int) -> None:
        """A device completed deferred chains outside poll(): EVENT_USED and doorbell now."""
        self._event_used((dev_num, index))
        self._ring_driver()

    def _event_used(self, key: tuple[int, int]) -> None:
        dev_num, index = key
        if self._open:
            pos = self._used_pos.get(key)
            try:
                if pos is not None and self.msgmem.to_driver.unconsumed(pos):
                    self.stats.coalesced += 1
                    return
            except VirtioMsgError as e:
                self._ring_broken(e)
                return
            raw = self._used_raw.get(key)
            if raw is None:  # the same slot every time: encoded and padded once per queue
                raw = pad(p.encode(p.event(MsgId.EVENT_USED, dev_num, index=index)))
                self._used_raw[key] = raw
            sent = self._send_raw(raw, "EVENT_USED")
            if sent is not None:
                self._used_pos[key] = sent

    def _send(self, msg: Message) -> int | None:
        return self._send_raw(p.encode(msg), msg.describe())

    def _send_raw(self, raw: bytes, what: str) -> int | None:
        ring = self.msgmem.to_driver
        try:
            pos = ring.put(raw)
        except VirtioMsgError as e:
            self._ring_broken(e)
            return None
        if pos is None:
            self.stats.dropped += 1
            log.warning("to-driver ring full: %s dropped", what)
            return None
        self.stats.messages_out += 1
        self._kick = True
        return pos

    # -- dispatch -------------------------------------------------------------------------

    def _discard(self, why: str) -> None:
        self.stats.error(why)
        log.warning("message discarded: %s", why)

    def _dispatch(self, raw: bytes) -> None:
        avail = p.event_avail(raw)  # the data path's message, without the general decoder
        if avail in self._queues:
            self._work[avail] = None
            return
        try:
            msg = p.decode(raw)
        except VirtioMsgError as e:
            self._discard(str(e))
            return
        if msg.response:
            self._discard(f"{msg.describe()}: the device side sent no request")
            return
        if msg.bus:
            reply = self._bus_message(msg)
        else:
            reply = self._transport_message(msg)
        if reply is not None:
            try:
                self._send(reply)
            except VirtioMsgError as e:  # a response that cannot be encoded: refuse the request
                self._discard(f"{msg.describe()}: {e}")

    def _transport_message(self, msg: Message) -> Message | None:
        dev = self.devices.get(msg.dev_num)
        if dev is None:
            if msg.msg_id == MsgId.GET_DEVICE_INFO:  # an inactive device: all fields 0
                zero = dict.fromkeys(p.LAYOUTS[(False, MsgId.GET_DEVICE_INFO, True)].fields, 0)
                return p.Message(msg.msg_id, msg.dev_num, msg.token, True, False, zero)
            self._discard(f"{msg.describe()}: no device {msg.dev_num} on this bus")
            return None
        if msg.msg_id == MsgId.EVENT_AVAIL:
            if msg["index"] >= len(dev.vqs):
                self._discard(f"{msg.describe()}: queue {msg['index']} does not exist")
                return None
            self._work[(msg.dev_num, msg["index"])] = None
            return None
        try:
            return dev.handle(msg)
        except VirtioMsgError as e:
            self._discard(str(e))
        except Exception as e:  # a device bug must not take the bus down: contain it
            log.exception("%s: %s failed", dev.name, msg.describe())
            dev.broken.append(f"{msg.describe()}: {type(e).__name__}: {e}")
            dev.status |= p.STATUS_DEVICE_NEEDS_RESET
        return None

    def _bus_message(self, msg: Message) -> Message | None:
        if msg.msg_id == BusMsgId.PING:
            return p.Message(msg.msg_id, 0, msg.token, True, True, {"data": msg["data"]})
        if msg.msg_id == BusMsgId.GET_DEVICES:
            off, count = msg["offset"], msg["count"]
            if p.HEADER.size + 6 + count // 8 > p.MAX_MSG_SIZE:
                self._discard(f"{msg.describe()}: {count} device numbers do not fit one answer")
                return None
            bits = bytearray(count // 8)
            for n in self.devices:
                if off <= n < off + count:
                    bits[(n - off) // 8] |= 1 << ((n - off) % 8)
            later = [n for n in self.devices if n >= off + count]
            nxt = min(later) // 8 * 8 if later else 0
            fields = {"offset": off, "count": count, "next_offset": nxt}
            return p.Message(msg.msg_id, 0, msg.token, True, True, fields, bytes(bits))
        self._discard(f"{msg.describe()}: not a message the device side receives")
        return None

    # -- observation ----------------------------------------------------------------------

    def snapshot(self) -> dict:
        s = self.stats
        client = self.server.client if self.server else None
        rings = (
            {
                r.name: {"head": r.head, "tail": r.tail, "broken": r.broken}
                for r in (self.msgmem.to_device, self.msgmem.to_driver)
            }
            if self._open
            else {}
        )
        if self.link is not None:
            size = len(self.link.buffer) if self._open else 0
        else:
            size = self._map.size() if self.shm_fd >= 0 else 0
        return {
            "transport": "virtio-msg",
            "socket": self.server.path if self.server else None,
            "link": self.link.describe() if self.link else None,
            "adopted": self.adopted,
            "epoch": self.msgmem.epoch if self._open else None,
            "skipped": self.msgmem.skipped if self._open else 0,
            "connected": client is not None,
            "peer": client.id if client else None,
            "connections": self.server.connections if self.server else 0,
            "message_memory": size,
            "messages_in": s.messages_in,
            "messages_out": s.messages_out,
            "doorbells_in": s.doorbells_in,
            "doorbells_out": s.doorbells_out,
            "dropped": s.dropped,
            "coalesced": s.coalesced,
            "protocol_errors": s.protocol_errors,
            "errors": list(s.errors),
            "rings": rings,
            "devices": [
                {
                    **d.snapshot(),
                    "mapped_bytes": self.mem.mapped_bytes,
                    "memory": self.mem.describe(),
                    "refused": self.mem.refused,
                }
                for d in self.devices.values()
            ],
        }
