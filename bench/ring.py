"""Ring microbenchmarks, C vs the pure-Python reference, same process, same run.

- pop + push: chains/s through the ring calls alone (the C side builds Python chain lists).
- batch pop + push: ``pop_batch``/``push_batch`` (two flat records per batch, one used
  buffer, no Python object per chain), the device side answering every chain with written
  length 1 through memoryview slices; against the pure-Python ring's pop + push and its
  own pop_batch + push_batch. The sides alternate over ``ROUNDS`` rounds; medians.
- serve loop: 4 KiB reads/s through the back-end's whole serve loop (``Vring.serve``) on a
  page-cache file: the C ring with the C blk request path (``serve_blk``), the C ring with
  the Python BlockDevice, and the pure-Python ring with the Python BlockDevice.
"""

from __future__ import annotations

import array
import os
import statistics
import tempfile
import time

from edgevirt.backend.devices import BlockDevice
from edgevirt.backend.devices import blk as b
from edgevirt.backend.memory import GuestMemory, anonymous
from edgevirt.backend.transport.vhost_user.vring import Vring
from edgevirt.backend.virtq import IMPLEMENTATIONS
from edgevirt.backend.virtq.driver import DriverQueue

SIZE = 256
ROUNDS = 5


def chains_per_second(cls: type, seconds: float = 1.0, indirect: bool = False) -> float:
    mem, drv, n = _filled(indirect)
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


def _filled(indirect: bool) -> tuple[GuestMemory, DriverQueue, int]:
    mem = GuestMemory()
    mem.add(anonymous(0x5C000000, 4 << 20))
    drv = DriverQueue(mem, SIZE)
    for _ in range(SIZE if indirect else SIZE // 3):  # header + data + status: 3 descriptors
        drv.add([b"h" * 16], [4096, 1], indirect=indirect, publish=False)
    return mem, drv, drv.avail_idx


def batch_per_second(cls: type, seconds: float = 1.0, indirect: bool = False) -> float:
    """pop_batch + push_batch; the used buffer is filled from the chain records by slices."""
    mem, drv, n = _filled(indirect)
    q = cls(SIZE, drv.desc, drv.avail, drv.used)
    used = array.array("I", bytes(8 * SIZE))
    u, ones = memoryview(used), memoryview(array.array("I", [1] * SIZE))
    done, idx = 0, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        idx = (idx + n) & 0xFFFF
        drv.set_avail_idx(idx)
        chains, _segs = q.pop_batch(mem)
        k = len(chains) // 16
        u[0 : 2 * k : 2] = memoryview(chains).cast("I")[0::4]  # heads
        u[1 : 2 * k : 2] = ones[:k]
        q.push_batch(mem, u[: 2 * k])
        done += k
    return done / (time.perf_counter() - t0)


def run_batch(seconds: float = 1.0) -> list[dict]:
    """C pop_batch/push_batch against the Python ring, the sides alternating per round."""
    if "c" not in IMPLEMENTATIONS:
        return []
    rows = []
    c_cls, py_cls = IMPLEMENTATIONS["c"], IMPLEMENTATIONS["python"]
    for indirect in (False, True):
        r: dict[str, list[float]] = {"c": [], "py": [], "py batch": []}
        for _ in range(ROUNDS):
            r["c"].append(batch_per_second(c_cls, seconds, indirect))
            r["py"].append(chains_per_second(py_cls, seconds, indirect))
            r["py batch"].append(batch_per_second(py_cls, seconds, indirect))
        med = {k: statistics.median(v) for k, v in r.items()}
        rows.append({
            "bench": f"ring batch pop+push ({'indirect' if indirect else 'direct'}, 3 desc/chain)",
            "c batch chains/s": round(med["c"]),
            "python pop+push chains/s": round(med["py"]),
            "python batch chains/s": round(med["py batch"]),
            "C batch/Python": round(med["c"] / med["py"], 1),
            "C batch/Python batch": round(med["c"] / med["py batch"], 1),
            "C batch/Python per round": ", ".join(
                f"{c / p:.1f}" for c, p in zip(r["c"], r["py"], strict=True)),
        })  # fmt: skip
    return rows


def serve_per_second(cls: type, fastpath: bool, path: str, seconds: float = 1.0) -> float:
    """4 KiB reads per second through Vring.serve, 85 chains (255 descriptors) per round."""
    mem = GuestMemory()
    mem.add(anonymous(0x5C000000, 4 << 20))
    drv = DriverQueue(mem, SIZE)
    for k in range(SIZE // 3):
        drv.add([b.REQ_HEADER.pack(b.T_IN, 0, 8 * k)], [4096, 1], publish=False)
    n = drv.avail_idx
    dev = BlockDevice(path)
    vr = Vring(0, num=SIZE, queue=cls(SIZE, drv.desc, drv.avail, drv.used))
    done, idx = 0, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        idx = (idx + n) & 0xFFFF
        drv.set_avail_idx(idx)  # the same heads again
        vr.serve(dev, mem, fastpath)
        done += n
    rate = done / (time.perf_counter() - t0)
    dev.close()
    return rate


def run_serve(seconds: float = 1.0) -> dict:
    with tempfile.NamedTemporaryFile(prefix="edgevirt-bench-") as f:
        f.write(os.urandom(SIZE // 3 * 4096))
        f.flush()
        py = serve_per_second(IMPLEMENTATIONS["python"], False, f.name, seconds)
        row: dict = {"bench": "serve loop, 4 KiB reads (page cache)", "python chains/s": round(py)}
        if "c" in IMPLEMENTATIONS:
            c_py = serve_per_second(IMPLEMENTATIONS["c"], False, f.name, seconds)
            c = serve_per_second(IMPLEMENTATIONS["c"], True, f.name, seconds)
            row.update({"C ring + Python blk chains/s": round(c_py), "c chains/s": round(c),
                        "C/Python": round(c / py, 1)})  # fmt: skip
        return row


def run(seconds: float = 1.0) -> list[dict]:
    rows = []
    for indirect in (False, True):
        res = {
            name: chains_per_second(cls, seconds, indirect) for name, cls in IMPLEMENTATIONS.items()
        }
        kind = "indirect" if indirect else "direct"
        row: dict = {"bench": f"ring pop+push ({kind}, 3 desc/chain)"}
        row.update({f"{k} chains/s": round(v) for k, v in res.items()})
        if "c" in res:
            row["C/Python"] = round(res["c"] / res["python"], 1)
        rows.append(row)
    return rows + run_batch(seconds) + [run_serve(seconds)]
