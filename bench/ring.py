"""Ring microbenchmark: chains/s through pop + push, C `_ring` vs the Python reference."""

from __future__ import annotations

import time

from edgevirt.backend.memory import GuestMemory, anonymous
from edgevirt.backend.virtq import IMPLEMENTATIONS
from edgevirt.backend.virtq.driver import DriverQueue

SIZE = 256


def chains_per_second(cls: type, seconds: float = 1.0, indirect: bool = False) -> float:
    mem = GuestMemory()
    mem.add(anonymous(0x5C000000, 4 << 20))
    drv = DriverQueue(mem, SIZE)
    per = SIZE if not indirect else SIZE
    for _ in range(per if indirect else SIZE // 3):  # header + data + status: 3 descriptors
        drv.add([b"h" * 16], [4096, 1], indirect=indirect, publish=False)
    n = drv.avail_idx
    q = cls(SIZE, drv.desc, drv.avail, drv.used)
    done, idx = 0, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        idx = (idx + n) & 0xFFFF
        drv.set_avail_idx(idx)  # the same heads again: slot = idx % size
        chains = q.pop(mem)
        q.push(mem, [(h, 1) for h, _, _ in chains])
        done += len(chains)
    return done / (time.perf_counter() - t0)


def run(seconds: float = 1.0) -> list[dict]:
    rows = []
    for indirect in (False, True):
        res = {
            name: chains_per_second(cls, seconds, indirect) for name, cls in IMPLEMENTATIONS.items()
        }
        row = {"bench": f"ring pop+push ({'indirect' if indirect else 'direct'}, 3 desc/chain)"}
        row.update({f"{k} chains/s": round(v) for k, v in res.items()})
        if "c" in res:
            row["C/Python"] = round(res["c"] / res["python"], 1)
        rows.append(row)
    return rows
