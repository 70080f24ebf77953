"""A transport-less :class:`~edgevirt.backend.devices.base.DeviceHost` for device tests.

It stands where vhost-user or virtio-msg would: it hands chains to a device (``offer``),
records what the device completes (``completed``) and checks the completion rules of the
device interface on every call: only chains the device was given and still holds, each
once, with a used length within the chain's device-writable bytes. File descriptors the
device watches are kept in ``readers``/``writers``; ``poll()`` calls the callbacks of the
ones that are ready (``select``), as the back-end's loop would. The fuzz target
``fuzz/fuzz_devices.py`` drives every device through it; a new device (GPIO, I2C, …) can
be unit-tested the same way before any transport is involved::

    host = FakeHost(mem)
    dev.attach(host)
    host.offer(dev, EVENTQ, Chain(0, [], [(gpa, 16)]))   # DEFERRED: nothing completed yet
    trigger_an_event()
    host.poll()                                          # the device completes it
    assert host.completed == [(EVENTQ, 0, 16)]
"""

from __future__ import annotations

import select
from collections.abc import Callable, Sequence

from edgevirt.backend.devices.base import DEFERRED, Chain, VirtioDevice
from edgevirt.backend.memory import GuestMemory


class CompletionError(AssertionError):
    """A device broke a completion rule (a bug in the device, never the guest's doing)."""


class FakeHost:
    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        self.readers: dict[int, Callable[[], None]] = {}
        self.writers: dict[int, Callable[[], None]] = {}
        self.timers: list[tuple[float, Callable[[], None]]] = []
        self.held: dict[int, tuple[int, Chain]] = {}  # id(chain) → (queue, chain)
        #: (queue, head, used length) in completion order.
        self.completed: list[tuple[int, int, int]] = []

    # -- DeviceHost ---------------------------------------------------------------------

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        self.readers.pop(fd, None)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        self.writers[fd] = callback

    def remove_writer(self, fd: int) -> None:
        self.writers.pop(fd, None)

    def every(self, seconds: float, callback: Callable[[], None]) -> None:
        self.timers.append((seconds, callback))

    def complete(self, queue: int, done: Sequence[tuple[Chain, int]]) -> None:
        for chain, n in done:
            entry = self.held.pop(id(chain), None)
            if entry is None or entry[1] is not chain:
                raise CompletionError(f"queue {queue}: chain {chain.head} completed, not held")
            if entry[0] != queue:
                raise CompletionError(
                    f"chain {chain.head} of queue {entry[0]} completed on queue {queue}"
                )
            if not 0 <= n <= chain.writable_len:
                raise CompletionError(
                    f"chain {chain.head}: used {n} outside 0..{chain.writable_len}"
                )
            self.completed.append((queue, chain.head, n))

    # -- what a transport does ----------------------------------------------------------

    def offer(self, dev: VirtioDevice, queue: int, chain: Chain) -> int:
        """Hand ``chain`` to ``dev`` as a transport would: an immediate answer is recorded
        as completed, DEFERRED keeps the chain held until the device completes it. A
        BackendError propagates (the transport would break the queue; call ``stop``)."""
        self.held[id(chain)] = (queue, chain)
        try:
            n = dev.handle(queue, chain, self.mem)
        except BaseException:
            self.held.pop(id(chain), None)
            raise
        if n != DEFERRED:
            self.complete(queue, [(chain, n)])
        return n

    def stop(self, dev: VirtioDevice, queue: int) -> None:
        """The queue stops: the device forgets its chains, and so do we."""
        dev.queue_stopped(queue)
        for key, (q, _) in list(self.held.items()):
            if q == queue:
                del self.held[key]

    def poll(self, timeout: float = 0.0) -> int:
        """Run the callbacks of ready fds once; returns how many ran."""
        fds_r, fds_w = list(self.readers), list(self.writers)
        if not fds_r and not fds_w:
            return 0
        r, w, _ = select.select(fds_r, fds_w, [], timeout)
        ran = 0
        for fd in r:
            cb = self.readers.get(fd)
            if cb is not None:
                cb()
                ran += 1
        for fd in w:
            cb = self.writers.get(fd)
            if cb is not None:
                cb()
                ran += 1
        return ran

    def run_all(self) -> None:
        """Call every watched fd's callback, ready or not (devices must cope with EAGAIN)."""
        for cb in list(self.readers.values()) + list(self.writers.values()):
            cb()
