"""atheris target: the asynchronous blk request path (BlkAio) on fuzzer-written guest memory.

Every input is a guest: byte 0 picks the queue size, byte 1 the engine (io_uring or the
thread pool), EVENT_IDX, a read-only disk, O_DIRECT and the buffer alignment that forces
bounces, byte 2 seg_max; the rest is the 16 KiB of guest memory that holds the rings, the
requests and their buffers. Up to four batches are submitted, each reaped in full before
the next. A bug is any exception other than RingError / GuestMemoryError, a request left
in flight after a full reap, a used length beyond what any request could write, a hang or
a crash.

The request logic is C, which atheris does not see, so random bytes alone rarely form a
request: ``--make-corpus DIR`` writes seed guests with valid reads, writes, flushes and
get_id requests (direct and indirect, split headers, unaligned buffers) to mutate from.

    .venv/bin/python fuzz/fuzz_blk.py --make-corpus fuzz/corpus/blk
    .venv/bin/python fuzz/fuzz_blk.py fuzz/corpus/blk -max_len=16384   # see fuzz/README.md
"""

import logging
import os
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    from edgevirt.backend.virtq import IMPLEMENTATIONS, BlkAio
    from edgevirt.errors import GuestMemoryError, RingError

GPA = 0x5C000000
MEM = 16384
SECTORS = 128  # a 64 KiB disk: requests beyond it are answered IOERR
USED_OFF = 0x2000


def _disk() -> tuple[int, int]:
    """(O_DIRECT fd or -1, page-cache fd) of a scratch disk on a file system with O_DIRECT."""
    d = tempfile.mkdtemp(prefix="ev-fuzz-blk-", dir=os.environ.get("EDGEVIRT_FUZZ_DIR"))
    path = os.path.join(d, "disk.img")
    with open(path, "wb") as f:
        f.write(bytes(range(256)) * (SECTORS * 2))
    buffered = os.open(path, os.O_RDWR)
    try:
        direct = os.open(path, os.O_RDWR | os.O_DIRECT)
    except OSError:
        direct = -1
    os.unlink(path)
    os.rmdir(d)
    return direct, buffered


DIRECT, BUFFERED = _disk()


@atheris.instrument_func
def feedback(res: object, err: Exception | None) -> int:
    """Branch on what the C path did: coverage the fuzzer can see (the C code it cannot),
    so inputs that reach reads, writes, bounces, status errors or each ring rule are kept."""
    n = 0
    if err is not None:
        rule = getattr(err, "rule", None) or type(err).__name__
        for i, name in enumerate(("zero_len", "loop", "head", "indirect", "next", "len",
                                  "GuestMemoryError", "head_in_flight", "nested")):  # fmt: skip
            if rule == name:
                n += i + 1
        return n
    if getattr(res, "reads", 0):
        n += 1
    if getattr(res, "writes", 0):
        n += 2
    if getattr(res, "flushes", 0):
        n += 4
    if getattr(res, "errors", 0):
        n += 8
    if getattr(res, "bounced", 0):
        n += 16
    if getattr(res, "rest", None):
        n += 32
    return n


class Mem:
    def __init__(self, data: bytes) -> None:
        self.table = ((GPA, bytearray(data.ljust(MEM, b"\0")[:MEM])),)


def TestOneInput(data: bytes) -> None:
    if len(data) < 3:
        return
    size = 1 << (data[0] % 8)  # 1..128 entries: rings fit below USED_OFF + 6 + 8 * 128
    flags = data[1]
    engine = "threads" if flags & 2 else "auto"
    readonly = bool(flags & 4)
    direct = DIRECT >= 0 and not flags & 16
    seg_max = (1, 2, 126, 1024)[data[2] % 4]
    mem = Mem(data[3:])
    q = IMPLEMENTATIONS["c"](size, GPA, GPA + 16 * size, GPA + USED_OFF, event_idx=bool(flags & 1))
    aio = BlkAio(DIRECT if direct else BUFFERED, SECTORS, seg_max, readonly, size,
                 engine=engine, direct=direct, align=512, mem_align=512 if flags & 8 else 1,
                 fd_buffered=BUFFERED)  # fmt: skip
    try:
        for _ in range(4):
            before = q.last_avail_idx
            try:
                res = aio.submit(q, mem, 8)
            except (RingError, GuestMemoryError) as e:
                feedback(None, e)
                break
            feedback(res, None)
            feedback(aio.reap(q, None, True), None)
            if aio.in_flight:
                raise AssertionError(f"{aio.in_flight} requests in flight after a full reap")
            if res.rest:  # not reads, writes or flushes: what BlockDevice.handle would get
                q.push(mem, [(h, 1) for h, _, _ in res.rest])
            used = mem.table[0][1]
            n = q.used_idx
            for i in range(min(n, size)):
                off = USED_OFF + 4 + 8 * ((n - 1 - i) % size)
                length = int.from_bytes(used[off + 4 : off + 8], "little")
                if length > SECTORS * 512 + 1:  # at most the whole disk read, plus the status
                    raise AssertionError(f"used length {length} beyond the disk")
            if q.last_avail_idx == before:
                break
    finally:
        aio.close()


def make_corpus(out: str) -> None:
    """Seed guests: a driver's well-formed requests in the layout TestOneInput reads."""
    import random
    import struct

    from edgevirt.backend.memory import GuestMemory, Region
    from edgevirt.backend.virtq.driver import DriverQueue

    os.makedirs(out, exist_ok=True)
    rng = random.Random(7)
    for k in range(12):
        size_bits = 3 + k % 4  # 8..64 entries
        region = Region(GPA, MEM, bytearray(MEM))
        drv = DriverQueue(GuestMemory([region]), 1 << size_bits, event_idx=bool(k & 1))
        drv.used, drv.data_start = GPA + USED_OFF, GPA + USED_OFF + 6 + 8 * 128 + 2
        drv.reset_data()
        for _ in range(rng.randrange(1, 6)):
            kind = rng.choice([0, 0, 1, 1, 4, 8])
            hdr = struct.pack("<IIQ", kind, 0, rng.randrange(SECTORS + 2))
            n = rng.choice([512, 1024, 700, 4096])
            if kind == 1:
                readable, writable = [hdr[:5], hdr[5:], rng.randbytes(n)], [1]
            elif kind in (0, 8):
                writable = [n // 3, n - n // 3, 1] if rng.random() < 0.5 else [n, 1]
                readable = [hdr]
            else:
                readable, writable = [hdr], [1]
            try:
                drv.add(readable, writable, indirect=rng.random() < 0.3)
            except (ValueError, GuestMemoryError):
                break
        ctl = bytes([size_bits, k & 31, 2])  # seg_max 126
        with open(os.path.join(out, f"seed-{k:02d}"), "wb") as f:
            f.write(ctl + bytes(region.buf))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--make-corpus":
        make_corpus(sys.argv[2])
        return
    logging.disable(logging.CRITICAL)  # broken-queue log lines are expected here
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
