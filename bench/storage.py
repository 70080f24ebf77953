"""Real storage, page cache bypassed: edgevirt ``cache=none`` (O_DIRECT; io_uring, thread
pool, synchronous) against qemu-storage-daemon ``cache.direct=on`` with ``aio=io_uring``,
``native`` and ``threads``, all on the same image file, same synthetic front-end, same run.

The image lives on the real file system (not tmpfs), is filled with random data and synced
first, and every side opens it with O_DIRECT, so no read is served from the page cache. The
front-end (bench/blk.drive) is Python and the same for everyone: its cost is in every
number alike. One queue of 512 entries (QD128 takes 384 descriptors), no EVENT_IDX.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from bench.blk import Starter, edgevirt, qsd
from bench.blk import measure as blk_measure

DISK = 1 << 30
QSIZE = 512

#: name, queue depth, block, sequential, write, requests per round
WORKLOADS = [
    ("4 KiB rand read QD1", 1, 4096, False, False, 2000),
    ("4 KiB rand read QD32", 32, 4096, False, False, 10000),
    ("4 KiB rand read QD128", 128, 4096, False, False, 10000),
    ("4 KiB rand write QD1", 1, 4096, False, True, 2000),
    ("4 KiB rand write QD32", 32, 4096, False, True, 10000),
    ("4 KiB rand write QD128", 128, 4096, False, True, 10000),
    ("128 KiB seq read QD32", 32, 131072, True, False, 3000),
    ("128 KiB seq write QD32", 32, 131072, True, True, 3000),
]

BACKENDS: list[tuple[str, Starter]] = [
    ("qsd io_uring", qsd("cache.direct=on,aio=io_uring")),
    ("ev io_uring", edgevirt(",cache=none")),
    ("qsd native", qsd("cache.direct=on,aio=native")),
    ("qsd threads", qsd("cache.direct=on,aio=threads")),
    ("ev threads", edgevirt(",cache=none,aio=threads")),
    ("ev sync", edgevirt(",cache=none,aio=sync")),
]


def image_dir() -> Path:
    """EDGEVIRT_BENCH_DIR, else build/ in the repository: a real file system with O_DIRECT."""
    d = Path(os.environ.get("EDGEVIRT_BENCH_DIR") or Path(__file__).resolve().parent.parent
             / "build" / "bench-storage")  # fmt: skip
    d.mkdir(parents=True, exist_ok=True)
    return d


def make_image(d: Path) -> Path:
    disk = d / "disk.img"
    if not disk.exists() or disk.stat().st_size != DISK:
        with open(disk, "wb") as f:
            for _ in range(DISK >> 20):
                f.write(os.urandom(1 << 20))  # real blocks: unwritten extents read for free
            f.flush()
            os.fsync(f.fileno())
    try:
        os.close(os.open(disk, os.O_RDONLY | os.O_DIRECT))
    except OSError as e:
        raise RuntimeError(f"{d} has no O_DIRECT ({e.strerror}): set EDGEVIRT_BENCH_DIR") from e
    return disk


def measure(
    backends: list[tuple[str, Starter]] = BACKENDS, rounds: int = 3
) -> dict[str, dict[str, dict]]:
    """All back-ends on the O_DIRECT image, interleaved rounds (bench.blk.measure)."""
    if not shutil.which("qemu-storage-daemon"):
        raise RuntimeError("qemu-storage-daemon not found (apt-get install qemu-system-common)")
    d = image_dir()
    return blk_measure(backends, WORKLOADS, make_image(d), d, rounds, qsize=QSIZE, disk=DISK)


#: name, queues, depth per queue (4 KiB random reads)
MQ_WORKLOADS = [("1 queue QD128", 1, 128), ("2 queues QD128 each", 2, 128),
                ("2 queues QD64 each", 2, 64)]  # fmt: skip
#: the disk: O_DIRECT on the real file system, as above
MQ_DISK: list[tuple[str, Starter]] = [
    ("qsd io_uring", qsd("cache.direct=on,aio=io_uring", 2)),
    ("ev io_uring", edgevirt(",cache=none,queues=2")),
]
#: no disk: the image in /dev/shm (RAM), read through the page cache with io_uring on both
#: sides, so only CPU (back-end, front-end, the kernel's copy) can limit the rate
MQ_RAM: list[tuple[str, Starter]] = [
    ("qsd io_uring", qsd("cache.direct=off,aio=io_uring", 2)),
    ("ev io_uring", edgevirt(",queues=2,aio=io_uring")),
]
RAM_DISK = 256 << 20


def measure_mq(ram: bool = False, rounds: int = 3, total: int = 20000) -> list[dict]:
    """Multiqueue: the same back-ends with two queues, driven on one or both (interleaved
    rounds, medians, as :func:`measure`); ``ram``: on a RAM-backed image instead of the disk."""
    backends = MQ_RAM if ram else MQ_DISK
    if ram:
        d = Path(tempfile.mkdtemp(prefix="edgevirt-bench-", dir="/dev/shm"))
        image, size = d / "disk.img", RAM_DISK
        with open(image, "wb") as f:
            for _ in range(size >> 20):
                f.write(os.urandom(1 << 20))
    else:
        d = image_dir()
        image, size = make_image(d), DISK
    per: dict[str, dict[str, dict]] = {}
    try:
        for wl, nq, qd in MQ_WORKLOADS:
            res = blk_measure(backends, [(wl, qd, 4096, False, False, total)], image, d,
                              rounds, qsize=QSIZE, disk=size, queues=nq)  # fmt: skip
            per.update(res)
    finally:
        if ram:
            shutil.rmtree(d)
    one = per[MQ_WORKLOADS[0][0]]
    out = []
    for wl, res in per.items():
        row: dict = {f"bench (4 KiB rand read, {'RAM' if ram else 'disk'})": wl}
        for name, _ in backends:
            row[f"{name} IOPS"] = round(res[name]["iops"])
            row[f"{name} / 1 queue"] = round(res[name]["iops"] / one[name]["iops"], 2)
            row[f"{name} CPU us/req"] = round(res[name]["be us/req"], 1)
            row[f"front-end CPU ({name})"] = f"{res[name]['fe cpu']:.0%}"
        out.append(row)
    return out


def rows(results: dict[str, dict[str, dict]]) -> list[dict]:
    out = []
    for wl, per in results.items():
        q, e = per["qsd io_uring"], per["ev io_uring"]
        row: dict = {"bench": wl}
        for name in per:
            row[f"{name} IOPS"] = round(per[name]["iops"])
        row["qsd io_uring MB/s"] = round(q["MB/s"], 1)
        row["ev io_uring MB/s"] = round(e["MB/s"], 1)
        row["qsd io_uring p50/p99 us"] = f"{q['p50 us']:.0f}/{q['p99 us']:.0f}"
        row["ev io_uring p50/p99 us"] = f"{e['p50 us']:.0f}/{e['p99 us']:.0f}"
        row["qsd/ev io_uring CPU us/req"] = f"{q['be us/req']:.1f}/{e['be us/req']:.1f}"
        row["ev/qsd io_uring"] = round(e["iops"] / q["iops"], 2)
        row["front-end CPU (ev io_uring)"] = f"{e['fe cpu']:.0%}"
        row["completions per wake-up qsd/ev io_uring"] = f"{q['per wake']:.1f}/{e['per wake']:.1f}"
        if "ev sync" in per:
            row["ev io_uring/ev sync"] = round(e["iops"] / per["ev sync"]["iops"], 2)
        out.append(row)
    return out


def run() -> list[dict]:
    return rows(measure())
