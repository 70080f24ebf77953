"""The driver side of a virtio-msg bus in Python: what QEMU and the guest module do.

:class:`MsgDriver` connects to the back-end's ivshmem server like QEMU's ivshmem-doorbell
(same protocol, real eventfds, real shared memory), checks the message memory header like
the guest module, and speaks virtio-msg as a driver: requests with tokens, responses
matched on ``(dev_num, token)``, events collected. Rings live in a carve-out the test maps
as a :class:`~edgevirt.backend.memory.GuestMemory` (see
:class:`~edgevirt.backend.virtq.driver.DriverQueue`). ``send_raw`` puts any bytes into the
to-device ring, for hostile tests::

    drv = MsgDriver(socket_path, carveout)
    info = drv.request(MsgId.GET_DEVICE_INFO, 0)
    drv.negotiate(0)
    q = DriverQueue(carveout, 8)
    drv.setup_queue(0, 0, q)
    drv.driver_ok(0)
"""

from __future__ import annotations

import mmap
import os
import select
import time
from collections.abc import Callable

from edgevirt.backend.memory import GuestMemory
from edgevirt.backend.transport.virtio_msg import ivshmem
from edgevirt.backend.transport.virtio_msg import protocol as p
from edgevirt.backend.transport.virtio_msg.channel import MessageMemory
from edgevirt.backend.transport.virtio_msg.protocol import Message, MsgId, VirtioMsgError
from edgevirt.backend.virtq.driver import DriverQueue

DRIVER_STATUS = p.STATUS_ACKNOWLEDGE | p.STATUS_DRIVER


class MsgDriver:
    def __init__(
        self,
        socket_path: str,
        mem: GuestMemory | None = None,
        *,
        vectors: int = 2,
        doorbell: bool = True,
        timeout: float = 5.0,
    ) -> None:
        self.mem = mem
        self.doorbell = doorbell
        self.timeout = timeout
        self.peer = ivshmem.connect(socket_path, vectors)
        try:
            size = os.fstat(self.peer.shm_fd).st_size
            self._map = mmap.mmap(self.peer.shm_fd, size, mmap.MAP_SHARED)
            self.msgmem = MessageMemory.attach(memoryview(self._map))
        except BaseException:
            self.peer.close()
            raise
        self.device_peer = self.msgmem.geometry.device_peer
        self.events: list[Message] = []
        self.stray: list[Message] = []  # responses nobody waited for
        self._token = 0

    def close(self) -> None:
        self.msgmem.close()
        self._map.close()
        self.peer.close()

    def __enter__(self) -> MsgDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw traffic ----------------------------------------------------------------------

    def ring(self, vector: int = 0) -> None:
        fds = self.peer.eventfds.get(self.device_peer, [])
        if self.doorbell and vector < len(fds):
            ivshmem.ring(fds[vector])

    def send_raw(self, raw: bytes, *, ring: bool = True) -> None:
        if self.msgmem.to_device.put(raw) is None:
            raise VirtioMsgError("to-device ring full")
        if ring:
            self.ring()

    def send(self, msg: Message) -> None:
        self.send_raw(p.encode(msg))

    def receive(self) -> list[Message]:
        """Everything waiting in the to-driver ring, decoded (strictly: a bad message raises)."""
        out = []
        while (raw := self.msgmem.to_driver.get()) is not None:
            out.append(p.decode(raw))
        return out

    def _wait(self, left: float) -> None:
        own = self.peer.own[:1]
        if own and select.select(own, [], [], min(left, 0.05))[0]:
            ivshmem.drain(own[0])
        elif not own:
            time.sleep(min(left, 0.002))

    def wait_for(self, match: Callable[[Message], bool], timeout: float | None = None) -> Message:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            for m in self.receive():
                (self.events if m.is_event else self.stray).append(m)
            for store in (self.stray, self.events):
                for i, m in enumerate(store):
                    if match(m):
                        return store.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no matching virtio-msg message arrived")
            self._wait(left)

    # -- requests -------------------------------------------------------------------------

    def next_token(self) -> int:
        self._token = self._token % 0xFFFF + 1
        return self._token

    def request(
        self,
        msg_id: MsgId,
        dev_num: int,
        data: bytes = b"",
        timeout: float | None = None,
        **fields: int,
    ) -> Message:
        token = self.next_token()
        self.send(p.request(msg_id, dev_num, token, data, **fields))
        return self.wait_for(
            lambda m: (
                m.response and m.msg_id == msg_id and m.dev_num == dev_num and m.token == token
            ),
            timeout,
        )

    def bus_request(self, msg_id: p.BusMsgId, tail: bytes = b"", **fields: int) -> Message:
        token = self.next_token()
        self.send(Message(int(msg_id), 0, token, False, True, fields, tail))
        return self.wait_for(
            lambda m: m.response and m.bus and m.msg_id == msg_id and m.token == token
        )

    # -- a driver's steps -----------------------------------------------------------------

    def features(self, dev_num: int) -> int:
        r = self.request(MsgId.GET_DEVICE_FEATURES, dev_num, index=0, num_blocks=2)
        return p.words_to_features(r.data, 0)

    def set_status(self, dev_num: int, status: int) -> int:
        return self.request(MsgId.SET_DEVICE_STATUS, dev_num, status=status)["status"]

    def negotiate(self, dev_num: int, features: int | None = None) -> int:
        """Reset, ACKNOWLEDGE|DRIVER, features (default: all offered), FEATURES_OK."""
        self.set_status(dev_num, 0)
        self.set_status(dev_num, DRIVER_STATUS)
        want = self.features(dev_num) if features is None else features
        self.request(
            MsgId.SET_DRIVER_FEATURES,
            dev_num,
            p.features_to_words(want, 0, 2),
            index=0,
            num_blocks=2,
        )
        return self.set_status(dev_num, DRIVER_STATUS | p.STATUS_FEATURES_OK)

    def setup_queue(self, dev_num: int, index: int, q: DriverQueue) -> None:
        self.request(
            MsgId.SET_VQUEUE,
            dev_num,
            index=index,
            size=q.size,
            desc=q.desc,
            driver=q.avail,
            device=q.used,
        )

    def driver_ok(self, dev_num: int) -> int:
        ok = DRIVER_STATUS | p.STATUS_FEATURES_OK | p.STATUS_DRIVER_OK
        return self.set_status(dev_num, ok)

    def kick(self, dev_num: int, index: int) -> None:
        self.send(p.event(MsgId.EVENT_AVAIL, dev_num, index=index, next=0))

    def wait_used(self, dev_num: int, index: int, timeout: float | None = None) -> Message:
        return self.wait_for(
            lambda m: m.msg_id == MsgId.EVENT_USED and m.dev_num == dev_num and m["index"] == index,
            timeout,
        )
