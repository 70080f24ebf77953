"""virtio-i2c (virtio spec 5.18): an I2C adapter whose requests are transfer segments.

One queue (requestq); no config space; ``VIRTIO_I2C_F_ZERO_LENGTH_REQUEST`` offered (the
spec makes it mandatory, Linux refuses a device without it). A request is one chain:
``virtio_i2c_out_hdr`` (``le16 addr, le16 padding, le32 flags``) readable, then the segment's
buffer (readable for a write, writable for a read with ``VIRTIO_I2C_FLAGS_M_RD``; absent for
a zero-length request), then the one-byte status, writable.

Requests with ``VIRTIO_I2C_FLAGS_FAIL_NEXT`` form a group with the next one: one I2C
transaction with repeated starts (a register write then a read). The device keeps the
group's chains (deferred) until its last request arrives, then runs it on the bus at once,
so a real adapter sees one ``I2C_RDWR`` and a simulated device one transaction. A group is
all-or-nothing for checks: a malformed request, a reserved flag, a 10-bit or unlisted
address fails every request of the group without touching the bus. A device that does not
answer (NACK) fails the request it NACKed and the rest of the group; requests before it
succeeded.

Addresses: 7-bit only (``addr`` = address << 1). The spec's 10-bit form (``11110xx0`` in the
low byte) is refused with an error status: neither Linux's virtio-i2c driver (it does not
advertise ``I2C_FUNC_10BIT_ADDR``) nor i2c-stub use it. **Allow-list**: the device answers
only the addresses it was given (``allow``); any other gets ``VIRTIO_I2C_MSG_ERR`` and a log
line, exactly like an absent device, so ``i2cdetect`` in the guest shows the allowed ones.

The bus behind it is an :class:`I2cBus`: simulated devices in
:mod:`~edgevirt.backend.devices.i2csim`, or a Linux adapter (``/dev/i2c-N``) in
:mod:`~edgevirt.backend.devices.i2cdev`.

Hostile driver rules: a header shorter than 8 bytes, no status byte, a write with writable
data bytes or a read with readable ones, a segment longer than :data:`MAX_SEGMENT`, a group
longer than :data:`MAX_GROUP` requests: error status (where there is a status byte), a
rate-limited log line and a counter; the queue and the process go on.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from edgevirt.backend.devices.base import DEFERRED, Chain, VirtioDevice, gather, scatter, views
from edgevirt.backend.memory import GuestMemory
from edgevirt.errors import BackendError, ConfigError

log = logging.getLogger(__name__)

REQUESTQ = 0
F_ZERO_LENGTH_REQUEST = 0
#: struct virtio_i2c_out_hdr: addr, padding, flags.
OUT_HDR = struct.Struct("<HHI")
FLAG_FAIL_NEXT, FLAG_M_RD = 1 << 0, 1 << 1
MSG_OK, MSG_ERR = 0, 1
#: Longest segment (Linux's i2c-dev limit for one message).
MAX_SEGMENT = 8192
#: Longest group (Linux's I2C_RDWR_IOCTL_MAX_MSGS).
MAX_GROUP = 42


class I2cError(Exception):
    """A transfer failed on the bus at message ``index`` (a NACK, an adapter error)."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


@dataclass
class Msg:
    """One segment: ``data`` to write, or ``length`` bytes to read into ``data``."""

    addr: int
    read: bool
    length: int
    data: bytes = b""


class I2cBus(Protocol):
    def transfer(self, msgs: list[Msg]) -> None:
        """Run ``msgs`` as one transaction, filling each read's ``data``; raise
        :class:`I2cError` naming the first message that failed."""

    def close(self) -> None: ...

    def describe(self) -> str:
        """One line for the stats file: what the bus is."""


@dataclass
class Request:
    chain: Chain
    msg: Msg | None  # None: malformed (already logged)
    status: list[memoryview] = field(default_factory=list)  # the status byte's view
    out: list[memoryview] = field(default_factory=list)  # a read's buffer


def parse_addresses(text: str | Iterable[object], where: str) -> list[int]:
    """``0x50+0x48`` (or a list of ints/strings) → sorted 7-bit addresses."""
    items = text.split("+") if isinstance(text, str) else list(text)
    out = set()
    for item in items:
        try:
            a = item if isinstance(item, int) else int(str(item), 0)
        except ValueError:
            raise ConfigError(f"{where}: address {item!r} is not a number") from None
        if not 0x03 <= a <= 0x77:
            raise ConfigError(f"{where}: address {a:#x} is outside the 7-bit range 0x03..0x77 "
                              "(10-bit addresses are not supported)")  # fmt: skip
        out.add(a)
    if not out:
        raise ConfigError(f"{where}: expected at least one address")
    return sorted(out)


class I2cDevice(VirtioDevice):
    name = "i2c"
    device_id = 34
    num_queues = 1
    features = 1 << F_ZERO_LENGTH_REQUEST

    def __init__(self, bus: I2cBus, allow: Iterable[int]) -> None:
        super().__init__()
        self.bus = bus
        self.allow = frozenset(allow)
        self.group: list[Request] = []

    def snapshot(self) -> dict:
        return {"allow": " ".join(f"{a:#04x}" for a in sorted(self.allow)),
                "bus": self.bus.describe(), "group_waiting": len(self.group)}  # fmt: skip

    def queue_stopped(self, queue: int) -> None:
        self.group.clear()

    def close(self) -> None:
        self.reset()
        self.bus.close()

    # -- chains ---------------------------------------------------------------------------

    def handle(self, queue: int, chain: Chain, mem: GuestMemory) -> int:
        if queue != REQUESTQ:
            raise BackendError(f"i2c: chain {chain.head} on queue {queue}, device has 1")
        self.stats.requests += 1
        req, flags = self._parse(chain, mem)
        if not req.status:
            return 0  # no status byte: nothing to answer with (counted in _parse)
        self.group.append(req)
        if flags & FLAG_FAIL_NEXT and len(self.group) < MAX_GROUP:
            return DEFERRED
        too_long = bool(flags & FLAG_FAIL_NEXT)
        if too_long:
            self.bad_request("group_too_long", "a group of more than %d requests", MAX_GROUP)
        group, self.group = self.group, []
        results = self._run(group, refuse=too_long)
        assert self.host is not None
        if len(group) > 1:
            self.host.complete(REQUESTQ, list(zip((r.chain for r in group[:-1]), results[:-1],
                                                  strict=True)))  # fmt: skip
        return results[-1]

    def _parse(self, chain: Chain, mem: GuestMemory) -> tuple[Request, int]:
        req = Request(chain, None)
        wlen = chain.writable_len
        if wlen < 1:
            self.bad_request("bad_chain", "request chain %d has no status byte", chain.head)
            return req, 0
        req.status = views(mem, chain.writable, skip=wlen - 1)
        if chain.readable_len < OUT_HDR.size:
            self.bad_request(
                "bad_header",
                "request chain %d: %d readable bytes, header is %d",
                chain.head,
                chain.readable_len,
                OUT_HDR.size,
            )
            return req, 0
        addr, _pad, flags = OUT_HDR.unpack(gather(mem, chain.readable, OUT_HDR.size))
        read = bool(flags & FLAG_M_RD)
        wdata = chain.readable_len - OUT_HDR.size
        rdata = wlen - 1
        if flags & ~(FLAG_FAIL_NEXT | FLAG_M_RD):
            self.bad_request("bad_flags", "request to %#06x: reserved flags %#x", addr, flags)
        elif (read and wdata) or (not read and rdata):
            self.bad_request(
                "bad_direction",
                "request to %#06x: %s with %d readable and %d writable data bytes",
                addr,
                "read" if read else "write",
                wdata,
                rdata,
            )
        elif max(wdata, rdata) > MAX_SEGMENT:
            self.bad_request(
                "bad_length",
                "request to %#06x: %d bytes, at most %d",
                addr,
                max(wdata, rdata),
                MAX_SEGMENT,
            )
        elif addr & 0xF9 == 0xF0 and addr >> 8:
            self.bad_request(
                "ten_bit_address", "request to %#06x: 10-bit addresses are not supported", addr
            )
        elif addr & 1 or addr >> 8:
            self.bad_request(
                "bad_address", "request to %#06x: not a 7-bit address (addr << 1)", addr
            )
        elif addr >> 1 not in self.allow:
            self.bad_request(
                "address_not_allowed",
                "request to %#04x: not in the allow-list (%s)",
                addr >> 1,
                ", ".join(f"{a:#04x}" for a in sorted(self.allow)),
            )
        else:
            if read:
                req.out = views(mem, chain.writable, drop_tail=1)
                req.msg = Msg(addr >> 1, True, rdata)
            else:
                data = gather(mem, chain.readable, chain.readable_len)[OUT_HDR.size :]
                req.msg = Msg(addr >> 1, False, wdata, data)
        return req, flags

    def _run(self, group: list[Request], refuse: bool = False) -> list[int]:
        """Run a complete group; write each status (and read data); return used lengths."""
        ok = 0
        msgs = [r.msg for r in group]
        if not refuse and all(m is not None for m in msgs):
            try:
                self.bus.transfer(msgs)  # type: ignore[arg-type]
                ok = len(group)
            except I2cError as e:
                ok = max(0, min(e.index, len(group)))
                self.stats.count("nack")
                log.info("i2c: transfer to %s: %s",
                         ", ".join(f"{m.addr:#04x}" for m in msgs if m), e)  # fmt: skip
        else:
            self.stats.count("group_refused")
        lengths = []
        for i, r in enumerate(group):
            m = r.msg
            status = MSG_OK if i < ok else MSG_ERR
            written = 1
            if m is not None and m.read and status == MSG_OK:
                scatter(r.out, m.data)
                written += m.length
                self.stats.bytes_written += m.length
            elif m is not None and status == MSG_OK:
                self.stats.bytes_read += m.length
            if m is not None:
                self.stats.count("read" if m.read else "write")
            r.status[0][0] = status
            if status != MSG_OK:
                self.stats.count("failed")
            lengths.append(written)
        return lengths
