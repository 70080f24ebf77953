"""virtio-gpio (virtio spec 5.17): named lines, direction and value, interrupts.

Queues: 0 requestq, 1 eventq (only with ``VIRTIO_GPIO_F_IRQ``, which is offered).
Config: ``le16 ngpio, u8 padding[2], le32 gpio_names_size``.

The lines themselves live in a *bank* (:class:`GpioBank`): the simulated one in
:mod:`~edgevirt.backend.devices.gpiosim` (driven from outside through a control socket), or
a real Linux gpiochip through the GPIO character device in
:mod:`~edgevirt.backend.devices.gpiocdev` (the service VM). The guest sees exactly the
bank's lines, numbered 0..ngpio-1 in the order of the device's ``lines`` option: that list
*is* the allow-list, a line not on it has no number the guest could name.

Interrupts (5.17.6.3): SET_IRQ_TYPE enables or disables a line's interrupt at the device;
the driver unmasks it by queueing one request/response pair for that line on the eventq,
and the device answers that pair (``VALID``) when the interrupt fires, which masks it again.
Edge types latch an edge that arrives while masked and deliver it on unmasking; level types
fire while the level is active and a buffer waits. Disabling (type NONE) drops the latch
and returns the waiting pair ``INVALID``. Event pairs are the device interface's deferred
chains: at most one per line is kept, so the driver cannot make the device hold more
than ``ngpio`` chains.

Hostile driver rules: a request shorter than its 8 bytes, a response buffer too small, a
line number ≥ ngpio, an unknown type, direction, value or IRQ type, an IRQ message without
``VIRTIO_GPIO_F_IRQ`` or for an output line: ``VIRTIO_GPIO_STATUS_ERR`` to the guest, a
(rate-limited) log line and a counter; a chain with no writable byte at all is completed
empty and counted. An eventq pair for a bad line, a second pair for the same line or a pair
for a line whose interrupt is off is returned ``INVALID`` at once.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from edgevirt.backend.devices.base import (
    DEFERRED,
    Chain,
    DeviceHost,
    VirtioDevice,
    gather,
    scatter,
    views,
)
from edgevirt.backend.memory import GuestMemory
from edgevirt.errors import BackendError, ConfigError

log = logging.getLogger(__name__)

REQUESTQ, EVENTQ = 0, 1
F_IRQ = 0
#: struct virtio_gpio_request: type, gpio, value.
REQUEST = struct.Struct("<HHI")
CONFIG = struct.Struct("<HxxI")
GET_LINE_NAMES, GET_DIRECTION, SET_DIRECTION, GET_VALUE, SET_VALUE, SET_IRQ_TYPE = range(1, 7)
MSG_NAMES = {1: "get_line_names", 2: "get_direction", 3: "set_direction", 4: "get_value",
             5: "set_value", 6: "set_irq_type"}  # fmt: skip
STATUS_OK, STATUS_ERR = 0, 1
DIR_NONE, DIR_OUT, DIR_IN = 0, 1, 2
DIRECTIONS = {DIR_NONE: "none", DIR_OUT: "out", DIR_IN: "in"}
IRQ_NONE, IRQ_RISING, IRQ_FALLING, IRQ_BOTH, IRQ_HIGH, IRQ_LOW = 0, 1, 2, 3, 4, 8
IRQ_TYPES = {IRQ_NONE: "none", IRQ_RISING: "edge-rising", IRQ_FALLING: "edge-falling",
             IRQ_BOTH: "edge-both", IRQ_HIGH: "level-high", IRQ_LOW: "level-low"}  # fmt: skip
IRQ_INVALID, IRQ_VALID = 0, 1
MAX_LINES = 512
#: Log lines about bad requests per device before going quiet (counters keep counting).


class GpioError(Exception):
    """A bank could not do what was asked (the guest gets ``STATUS_ERR``)."""


class GpioBank(Protocol):
    """The lines behind a virtio-gpio device, numbered as the guest sees them."""

    @property
    def names(self) -> Sequence[str]: ...

    def attach(self, host: DeviceHost, changed: Callable[[int, int, int], None]) -> None:
        """Start watching; call ``changed(line, level, when_ns)`` when an input line's level
        moves (``when_ns``: when it moved, CLOCK_MONOTONIC, as ``time.monotonic_ns``)."""

    def set_direction(self, line: int, direction: int, value: int) -> None:
        """``DIR_NONE`` releases, ``DIR_IN`` makes it an input (edges watched), ``DIR_OUT``
        an output driving ``value``."""

    def set_value(self, line: int, value: int) -> None: ...

    def get_value(self, line: int) -> int: ...

    def close(self) -> None: ...

    def describe(self) -> str:
        """One line for the stats file: what the lines are (simulated, which chip)."""


@dataclass
class Line:
    direction: int = DIR_NONE
    value: int = 0  # the output value the driver set (used when it becomes an output)
    irq_type: int = IRQ_NONE
    latched: bool = False
    level: int = 0  # last level the bank reported for an input
    event: Chain | None = None  # the driver's unmasked eventq pair
    changed_ns: int = 0  # when the bank last reported a change (0: none pending)


class GpioDevice(VirtioDevice):
    name = "gpio"
    device_id = 41
    num_queues = 2
    features = 1 << F_IRQ

    def __init__(self, bank: GpioBank) -> None:
        super().__init__()
        n = len(bank.names)
        if not 1 <= n <= MAX_LINES:
            raise ConfigError(f"gpio: {n} lines, expected 1..{MAX_LINES}")
        self.bank = bank
        self.lines = [Line() for _ in range(n)]
        self.names_block = b"".join(name.encode("ascii") + b"\0" for name in bank.names)
        #: (last, max) from a line's change to its interrupt's completion, nanoseconds.
        self.irq_latency_ns = (0, 0)

    def attach(self, host: DeviceHost) -> None:
        super().attach(host)
        self.bank.attach(host, self._changed)

    def config(self) -> bytes:
        return CONFIG.pack(len(self.lines), len(self.names_block))

    def snapshot(self) -> dict:
        """``lines``: ``name:direction[/irq type][+armed]`` each (armed: the driver's eventq
        pair waits for the interrupt), ``bank``: where the lines are."""
        lines = []
        for name, ln in zip(self.bank.names, self.lines, strict=True):
            irq = f"/{IRQ_TYPES[ln.irq_type]}" if ln.irq_type else ""
            lines.append(f"{name}:{DIRECTIONS[ln.direction]}{irq}{'+armed' if ln.event else ''}")
        last, top = (round(n / 1000) for n in self.irq_latency_ns)
        return {"lines": " ".join(lines), "bank": self.bank.describe(),
                **({"irq_latency_us": f"last {last} max {top}"} if top else {})}  # fmt: skip

    # -- lifetime -------------------------------------------------------------------------

    def queue_stopped(self, queue: int) -> None:
        if queue == EVENTQ:
            for ln in self.lines:
                ln.event = None

    def reset(self) -> None:
        super().reset()
        for i, ln in enumerate(self.lines):
            if ln.direction != DIR_NONE:
                try:
                    self.bank.set_direction(i, DIR_NONE, 0)
                except GpioError as e:
                    log.warning("gpio: line %d: release on reset: %s", i, e)
            self.lines[i] = Line()

    def close(self) -> None:
        self.reset()
        self.bank.close()

    # -- chains ---------------------------------------------------------------------------

    def handle(self, queue: int, chain: Chain, mem: GuestMemory) -> int:
        if queue == REQUESTQ:
            return self._request(chain, mem)
        if queue == EVENTQ:
            return self._unmask(chain, mem)
        raise BackendError(f"gpio: chain {chain.head} on queue {queue}, device has 2")

    def _request(self, chain: Chain, mem: GuestMemory) -> int:
        self.stats.requests += 1
        out = views(mem, chain.writable)
        if not out:
            self.bad_request("bad_chain", "request chain %d has no response buffer", chain.head)
            return 0
        if chain.readable_len != REQUEST.size:
            self.bad_request(
                "bad_request_size",
                "request chain %d: %d readable bytes, expected %d",
                chain.head,
                chain.readable_len,
                REQUEST.size,
            )
            return _answer(out, STATUS_ERR)
        typ, gpio, value = REQUEST.unpack(gather(mem, chain.readable, REQUEST.size))
        self.stats.count(MSG_NAMES.get(typ, "unknown_type"))
        if typ == GET_LINE_NAMES:
            size = len(self.names_block)
            if chain.writable_len < 1 + size:
                self.bad_request(
                    "bad_response_size",
                    "get_line_names: response of %d bytes, expected %d",
                    chain.writable_len,
                    1 + size,
                )
                return _answer(out, STATUS_ERR)
            self.stats.bytes_written += 1 + size
            return scatter(out, bytes([STATUS_OK]) + self.names_block)
        if typ not in MSG_NAMES:
            self.bad_request("bad_type", "request type %d unknown (1..6)", typ)
            return _answer(out, STATUS_ERR)
        if chain.writable_len != 2:
            self.bad_request(
                "bad_response_size",
                "%s: response of %d bytes, expected 2",
                MSG_NAMES[typ],
                chain.writable_len,
            )
            return _answer(out, STATUS_ERR)
        if gpio >= len(self.lines):
            self.bad_request(
                "bad_line", "%s: line %d, device has %d", MSG_NAMES[typ], gpio, len(self.lines)
            )
            return _answer(out, STATUS_ERR)
        try:
            result = self._do(typ, gpio, value)
        except GpioError as e:
            self.bad_request(
                "bank_error", "%s line %d (%s): %s", MSG_NAMES[typ], gpio, self.bank.names[gpio], e
            )
            return _answer(out, STATUS_ERR)
        if result is None:
            return _answer(out, STATUS_ERR)
        return scatter(out, bytes([STATUS_OK, result]))

    def _do(self, typ: int, gpio: int, value: int) -> int | None:
        ln = self.lines[gpio]
        what = f"{MSG_NAMES[typ]} line {gpio}"
        if typ == GET_DIRECTION:
            return ln.direction
        if typ == SET_DIRECTION:
            if value not in DIRECTIONS:
                self.bad_request(
                    "bad_direction", "%s: direction %d (0 none, 1 out, 2 in)", what, value
                )
                return None
            try:
                self.bank.set_direction(gpio, value, ln.value)
            except GpioError:
                ln.direction = DIR_NONE  # a real bank released the line before failing
                self._disable(gpio)
                raise
            ln.direction = value
            if value == DIR_IN:
                ln.level = self.bank.get_value(gpio)
            else:
                self._disable(gpio)  # an output or released line raises no interrupt
            return 0
        if typ == GET_VALUE:
            return self.bank.get_value(gpio) & 1
        if typ == SET_VALUE:
            if value > 1:
                self.bad_request("bad_value", "%s: value %d (0 or 1)", what, value)
                return None
            ln.value = value
            if ln.direction == DIR_OUT:
                self.bank.set_value(gpio, value)
            return 0
        # SET_IRQ_TYPE
        if not self.acked_features >> F_IRQ & 1:
            self.bad_request("irq_not_negotiated", "%s without VIRTIO_GPIO_F_IRQ", what)
            return None
        if value not in IRQ_TYPES:
            self.bad_request("bad_irq_type", "%s: type %d (0, 1, 2, 3, 4 or 8)", what, value)
            return None
        if value != IRQ_NONE and ln.direction == DIR_OUT:
            self.bad_request("irq_on_output", "%s: the line is an output", what)
            return None
        if value == IRQ_NONE:
            self._disable(gpio)
        else:
            ln.irq_type, ln.latched = value, False
            if ln.direction == DIR_IN:
                ln.level = self.bank.get_value(gpio)
            self._fire(gpio)
        return 0

    # -- interrupts -----------------------------------------------------------------------

    def _unmask(self, chain: Chain, mem: GuestMemory) -> int:
        self.stats.count("unmask")
        out = views(mem, chain.writable)
        if not out or chain.readable_len != 2:
            self.bad_request(
                "bad_event_chain",
                "eventq chain %d: %d readable / %d writable bytes, expected 2 / 1",
                chain.head,
                chain.readable_len,
                chain.writable_len,
            )
            return _answer(out, IRQ_INVALID) if out else 0
        (gpio,) = struct.unpack("<H", gather(mem, chain.readable, 2))
        if gpio >= len(self.lines):
            self.bad_request("bad_line", "eventq: line %d, device has %d", gpio, len(self.lines))
            return _answer(out, IRQ_INVALID)
        ln = self.lines[gpio]
        if ln.event is not None:
            self.bad_request("event_duplicate", "eventq: line %d unmasked twice", gpio)
            return _answer(out, IRQ_INVALID)
        if ln.irq_type == IRQ_NONE:
            self.stats.count("unmask_disabled")
            return _answer(out, IRQ_INVALID)
        ln.event = chain
        if self._active(ln):
            ln.event, ln.latched = None, False
            self.stats.count("irqs")
            return _answer(out, IRQ_VALID)
        return DEFERRED

    def _changed(self, gpio: int, level: int, when_ns: int) -> None:
        """The bank saw ``gpio`` move to ``level`` at ``when_ns`` (an input line)."""
        if not 0 <= gpio < len(self.lines):
            return
        ln = self.lines[gpio]
        ln.changed_ns = when_ns
        old, ln.level = ln.level, level & 1
        self.stats.count("edges")
        if ln.irq_type & IRQ_BOTH and old != ln.level:
            rising = ln.level == 1
            if ln.irq_type & (IRQ_RISING if rising else IRQ_FALLING):
                ln.latched = True
        self._fire(gpio)

    def _active(self, ln: Line) -> bool:
        if ln.irq_type & IRQ_BOTH:
            return ln.latched
        if ln.irq_type == IRQ_HIGH:
            return ln.level == 1
        if ln.irq_type == IRQ_LOW:
            return ln.level == 0
        return False

    def _fire(self, gpio: int) -> None:
        ln = self.lines[gpio]
        if ln.event is None or not self._active(ln) or self.host is None:
            return
        chain, ln.event, ln.latched = ln.event, None, False
        self.stats.count("irqs")
        if ln.changed_ns:  # a waiting pair answered for this change: the device's latency
            took = time.monotonic_ns() - ln.changed_ns
            self.irq_latency_ns = (took, max(took, self.irq_latency_ns[1]))
            ln.changed_ns = 0
        self._complete(chain, IRQ_VALID)

    def _disable(self, gpio: int) -> None:
        ln = self.lines[gpio]
        ln.irq_type, ln.latched, ln.changed_ns = IRQ_NONE, False, 0
        if ln.event is not None:
            chain, ln.event = ln.event, None
            self._complete(chain, IRQ_INVALID)

    def _complete(self, chain: Chain, status: int) -> None:
        assert self.host is not None
        try:
            n = _answer(views(self.host.mem, chain.writable), status)
        except BackendError as e:  # the memory table changed under a kept chain
            self.bad_request("bad_event_buffer", "eventq chain %d: %s", chain.head, e)
            n = 0
        self.host.complete(EVENTQ, [(chain, n)])


def _answer(out: list[memoryview], status: int) -> int:
    """Write a one-byte status (and zero the rest of a two-byte response)."""
    return scatter(out, bytes([status]) + bytes(min(1, sum(len(b) for b in out) - 1)))
