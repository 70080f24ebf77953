"""YMODEM sender (1 KiB blocks, CRC-16): how a board without network receives a file.

U-Boot's ``loady`` is the receiver: it sends ``C`` to ask for CRC mode, we send block 0
(file name and size), the data in 1 KiB blocks (last one padded with CPMEOF), EOT (answered
by NAK then ACK, or ACK directly), and an empty block 0 that ends the batch. Each block is
retried on NAK or silence; too many retries abort the transfer with CAN.

After block 0 a receiver should send ``C`` again to ask for the data. lrzsz does so at
once; U-Boot's xyzModem does not: it sends ACK and waits for block 1, sending ``C`` only
when its own header timeout expires (measured: 4.25 s per file under QEMU). So the sender
waits :data:`DATA_C_GRACE` for that ``C`` and then sends block 1 anyway; a ``C`` that
arrives while block 1 awaits its ACK asks for block 1 again, and it is resent (a receiver
ACKs a duplicate block and discards it).
"""

from __future__ import annotations

import binascii
import logging
import time
from collections.abc import Callable
from pathlib import Path

from edgevirt.errors import ConsoleError

log = logging.getLogger(__name__)

SOH, STX, EOT, ACK, NAK, CAN, CRC = 0x01, 0x02, 0x04, 0x06, 0x15, 0x18, ord("C")
CPMEOF = 0x1A
BLOCK = 1024
MAX_RETRIES = 10
#: How long to wait for the receiver's ``C`` after block 0 before sending block 1 anyway.
DATA_C_GRACE = 0.25

#: ``getc(timeout)`` returns the next byte from the receiver, or None on silence.
GetC = Callable[[float], int | None]
Put = Callable[[bytes], None]
Progress = Callable[[int, int], None]


class YmodemError(ConsoleError):
    """The receiver refused or never acknowledged part of a transfer."""


def _block(seq: int, payload: bytes, size: int) -> bytes:
    data = payload.ljust(size, bytes([CPMEOF if seq else 0]))
    head = bytes([STX if size == BLOCK else SOH, seq & 0xFF, 0xFF - (seq & 0xFF)])
    return head + data + binascii.crc_hqx(data, 0).to_bytes(2, "big")


def header_block(name: str, size: int) -> bytes:
    meta = name.encode() + b"\0" + str(size).encode() + b" "
    if len(meta) > 128:
        raise YmodemError(f"ymodem: file name {name!r} too long for block 0")
    return _block(0, meta.ljust(128, b"\0"), 128)


def _poll_for(getc: GetC, wanted: set[int], timeout: float, what: str) -> int | None:
    """The first byte in ``wanted`` within ``timeout``, or None; CAN raises."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c = getc(max(0.01, deadline - time.monotonic()))
        if c is None:
            continue
        if c in wanted:
            return c
        if c == CAN:
            raise YmodemError(f"ymodem: receiver cancelled while waiting for {what}")
        # Anything else is line noise or the receiver's banner: keep waiting.
    return None


def _wait_for(getc: GetC, wanted: set[int], timeout: float, what: str) -> int:
    c = _poll_for(getc, wanted, timeout, what)
    if c is None:
        raise YmodemError(f"ymodem: no {what} from the receiver within {timeout:.0f}s")
    return c


def _send_acked(
    getc: GetC, put: Put, block: bytes, what: str, timeout: float, *, resend_on_c: bool = False
) -> None:
    wanted = {ACK, NAK, CRC} if resend_on_c else {ACK, NAK}
    for attempt in range(MAX_RETRIES):
        put(block)
        try:
            c = _wait_for(getc, wanted, timeout, f"ACK for {what}")
        except YmodemError:
            if attempt == MAX_RETRIES - 1:
                raise
            continue
        if c == ACK:
            return
        log.debug("ymodem: %s for %s, retry %d", "C" if c == CRC else "NAK", what, attempt + 1)
    put(bytes([CAN, CAN]))
    raise YmodemError(f"ymodem: {what} refused {MAX_RETRIES} times")


def send(
    getc: GetC,
    put: Put,
    path: Path,
    *,
    start_timeout: float = 30.0,
    block_timeout: float = 10.0,
    progress: Progress | None = None,
) -> int:
    """Send ``path`` to a waiting YMODEM receiver; return the bytes sent."""
    data = path.read_bytes()
    _wait_for(getc, {CRC}, start_timeout, "'C' (receiver ready)")
    _send_acked(getc, put, header_block(path.name, len(data)), "block 0", block_timeout)
    # None: no 'C' (U-Boot), the receiver is already waiting for block 1.
    c_seen = _poll_for(getc, {CRC}, DATA_C_GRACE, "'C' after block 0") is not None
    total = len(data)
    for i, off in enumerate(range(0, total, BLOCK)):
        _send_acked(
            getc,
            put,
            _block(i + 1, data[off : off + BLOCK], BLOCK),
            f"block {i + 1}",
            block_timeout,
            resend_on_c=(i == 0 and not c_seen),
        )
        if progress:
            progress(min(off + BLOCK, total), total)
    for _ in range(MAX_RETRIES):
        put(bytes([EOT]))
        if _wait_for(getc, {ACK, NAK}, block_timeout, "ACK for EOT") == ACK:
            break
    else:
        raise YmodemError("ymodem: EOT never acknowledged")
    # An empty block 0 ends the batch.
    _wait_for(getc, {CRC}, block_timeout, "'C' before the end-of-batch block")
    _send_acked(getc, put, _block(0, b"", 128), "end-of-batch block", block_timeout)
    return total
