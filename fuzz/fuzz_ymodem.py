"""atheris target: the ymodem sender against whatever a receiver answers (U-Boot's ``loady``
on a board, or line noise): the input is the byte stream the receiver sends, with silences.

Each input byte is one receiver event: 0xFF is silence for the rest of the current wait,
anything else is a byte on the line (``C``, ACK, NAK, CAN, noise). Time is simulated (a
silence advances the clock to the waiter's deadline), so a run costs microseconds. Checks:
only ``ConsoleError`` (``YmodemError``) comes out; no hang; every block put on the line has
the right framing, sequence number and CRC-16; a completed send delivered the file's bytes
in order (block 0 names its size) and returns that size.

    PYTHONPATH=. .venv/bin/python fuzz/fuzz_ymodem.py fuzz/corpus/ymodem -max_len=512
"""

import binascii
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guard import Guard  # noqa: E402

with atheris.instrument_imports(include=["edgevirt"]):
    from edgevirt.console import ymodem

guard = Guard()
PAYLOAD = bytes(range(256)) * 9 + b"tail"  # 2308 bytes: 3 data blocks, the last padded


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def check(out: Path, events: bytes) -> None:
    clock = Clock()
    ymodem.time = clock  # type: ignore[assignment]
    src = out / "payload.bin"
    src.write_bytes(PAYLOAD)
    stream = iter(events)
    sent: list[bytes] = []

    def getc(timeout: float) -> int | None:
        clock.now += 1e-4
        c = next(stream, 0xFF)
        if c == 0xFF:
            clock.now += timeout
            return None
        return c

    result = ymodem.send(getc, sent.append, src, start_timeout=5, block_timeout=2)
    delivered = bytearray()
    expected_seq = 1
    size = None
    for blk in sent:
        if blk in (bytes([ymodem.EOT]), bytes([ymodem.CAN, ymodem.CAN])):
            continue
        n = 1024 if blk[0] == ymodem.STX else 128
        assert blk[0] in (ymodem.STX, ymodem.SOH) and len(blk) == 3 + n + 2, blk[:3]
        assert blk[1] == 0xFF - blk[2]
        data = blk[3 : 3 + n]
        assert binascii.crc_hqx(data, 0).to_bytes(2, "big") == blk[-2:]
        if blk[1] == 0 and size is None:
            size = int(data.split(b"\0")[1].split(b" ")[0])
        elif blk[1] != 0:
            if blk[1] == (expected_seq - 1) & 0xFF and delivered:
                continue  # a resend of the previous block
            assert blk[1] == expected_seq & 0xFF, (blk[1], expected_seq)
            delivered += data
            expected_seq += 1
    assert result == len(PAYLOAD) == size
    assert bytes(delivered[: len(PAYLOAD)]) == PAYLOAD


def TestOneInput(data: bytes) -> None:
    guard.run(lambda out: check(out, data))


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
