"""atheris target: the split ring, C and Python side by side on fuzzer-written guest memory.

Every input is a guest: its bytes become the rings and buffers. Both implementations must
give the same chains (through pop/push, or pop_batch/push_batch: a bit of the input picks)
or the same error (rule and message); anything other than RingError /
GuestMemoryError is a bug, and so is a difference.

    .venv/bin/python fuzz/fuzz_ring.py -runs=200000 -max_len=8192   # see fuzz/README.md
"""

import logging
import sys

import atheris

with atheris.instrument_imports():
    from edgevirt.backend.virtq import IMPLEMENTATIONS
    from edgevirt.backend.virtq.pyring import BATCH_CHAIN, USED_ELEM
    from edgevirt.errors import GuestMemoryError, RingError

GPA = 0x5C000000
MEM = 16384


class Mem:
    def __init__(self, data: bytes) -> None:
        self.table = ((GPA, bytearray(data.ljust(MEM, b"\0")[:MEM])),)


def run(cls, data: bytes, size: int, event_idx: bool, budget: int, batch: bool):
    """pop/push rounds, or the same through pop_batch/push_batch (records kept as bytes)."""
    mem = Mem(data)
    q = cls(size, GPA, GPA + 16 * size, GPA + 0x2000, event_idx=event_idx)
    q.last_avail_idx = data[2] if len(data) > 2 else 0
    out = []
    for _ in range(budget):
        try:
            chains = q.pop_batch(mem, 8) if batch else q.pop(mem, 8)
        except (RingError, GuestMemoryError) as e:
            out.append(("error", type(e).__name__, getattr(e, "rule", None), str(e)))
            break
        if not chains or chains == (b"", b""):
            break
        out.append(("chains", chains))
        if batch:  # each chain's head, written length 1
            heads = [h for h, _, _, _ in BATCH_CHAIN.iter_unpack(chains[0])]
            q.push_batch(mem, b"".join(USED_ELEM.pack(h, 1) for h in heads))
        else:
            q.push(mem, [(h, 1) for h, _, _ in chains])
        out.append(("notify", q.should_notify(mem)))
    return out, bytes(mem.table[0][1])


def TestOneInput(data: bytes) -> None:
    if len(data) < 2:
        return
    size = 1 << (data[0] % 8)  # 1..128 entries: rings fit the 16 KiB window
    event_idx = bool(data[1] & 1)
    batch = bool(data[1] & 2)
    results = [run(cls, data, size, event_idx, 4, batch) for cls in IMPLEMENTATIONS.values()]
    if any(r != results[0] for r in results[1:]):
        raise AssertionError(f"C and Python rings differ: {results}")


def main() -> None:
    logging.disable(logging.CRITICAL)  # broken-queue log lines are expected here
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
