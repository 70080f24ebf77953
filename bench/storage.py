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
import signal
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from bench.blk import drive, wait_socket

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

Starter = Callable[[Path, Path], tuple[subprocess.Popen, str]]


def edgevirt(opts: str) -> Starter:
    def start(disk: Path, d: Path) -> tuple[subprocess.Popen, str]:
        sock_dir = d / f"ev{abs(hash(opts))}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgevirt", "backend", "run", "--log-level", "warning",
             "--device", f"blk:path={disk},cache=none{opts}", "--socket-dir", str(sock_dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        return proc, str(sock_dir / "0-blk.sock")

    return start


def qsd(aio: str, queues: int = 1) -> Starter:
    def start(disk: Path, d: Path) -> tuple[subprocess.Popen, str]:
        sock = str(d / f"qsd-{aio}-{queues}.sock")
        proc = subprocess.Popen(
            ["qemu-storage-daemon",
             "--blockdev", f"driver=file,node-name=f,filename={disk},cache.direct=on,aio={aio}",
             "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,"
             f"addr.path={sock},writable=on,num-queues={queues}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        return proc, sock

    return start


BACKENDS: list[tuple[str, Starter]] = [
    ("qsd io_uring", qsd("io_uring")),
    ("ev io_uring", edgevirt("")),
    ("qsd native", qsd("native")),
    ("qsd threads", qsd("threads")),
    ("ev threads", edgevirt(",aio=threads")),
    ("ev sync", edgevirt(",aio=sync")),
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
    """Every back-end runs at once (idle unless driven); each workload is driven ``rounds``
    times on every back-end in turn, the order rotated per round, so load from elsewhere on
    the machine spreads over all sides; each figure is the median of its rounds."""
    if not shutil.which("qemu-storage-daemon"):
        raise RuntimeError("qemu-storage-daemon not found (apt-get install qemu-system-common)")
    d = image_dir()
    disk = make_image(d)
    procs: list[subprocess.Popen] = []
    raw: dict[str, dict[str, list[dict]]] = {}
    try:
        socks = []
        for name, start in backends:
            proc, sock = start(disk, d)
            procs.append(proc)
            socks.append((name, sock))
        for (_name, sock), proc in zip(socks, procs, strict=True):
            wait_socket(sock, proc)
        for wl, qd, block, seq, write, total in WORKLOADS:
            kw = {"write": write, "qsize": QSIZE, "disk": DISK}
            for r in range(rounds):
                for name, sock in socks[r % len(socks) :] + socks[: r % len(socks)]:
                    if r == 0:
                        drive(sock, qd, block, seq, min(total, 300), **kw)  # warm-up
                    try:
                        res = drive(sock, qd, block, seq, total, **kw)
                    except RuntimeError as e:
                        raise RuntimeError(f"{name}, {wl}, round {r}: {e}") from e
                    raw.setdefault(wl, {}).setdefault(name, []).append(res)
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(10)
    return {
        wl: {name: {k: statistics.median(m[k] for m in runs) for k in runs[0]}
             for name, runs in per.items()}
        for wl, per in raw.items()
    }  # fmt: skip


#: name, queues, depth per queue (4 KiB random reads)
MQ_WORKLOADS = [("1 queue QD128", 1, 128), ("2 queues QD128 each", 2, 128),
                ("2 queues QD64 each", 2, 64)]  # fmt: skip
MQ_BACKENDS: list[tuple[str, Starter]] = [
    ("qsd io_uring", qsd("io_uring", 2)),
    ("ev io_uring", edgevirt(",queues=2")),
]


def measure_mq(rounds: int = 3, total: int = 20000) -> list[dict]:
    """Multiqueue: the same back-ends with two queues, driven on one or both (interleaved
    rounds, medians as in :func:`measure`)."""
    d = image_dir()
    disk = make_image(d)
    procs, socks = [], []
    raw: dict[str, dict[str, list[float]]] = {}
    try:
        for name, start in MQ_BACKENDS:
            proc, sock = start(disk, d)
            procs.append(proc)
            socks.append((name, sock))
        for (_n, sock), proc in zip(socks, procs, strict=True):
            wait_socket(sock, proc)
        for wl, nq, qd in MQ_WORKLOADS:
            for r in range(rounds):
                for name, sock in socks[r % 2 :] + socks[: r % 2]:
                    res = drive(sock, qd, 4096, False, total, qsize=QSIZE, disk=DISK, queues=nq)
                    raw.setdefault(wl, {}).setdefault(name, []).append(res["iops"])
                    raw[wl].setdefault(f"{name} fe", []).append(res["fe cpu"])
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(10)
    one = {name: statistics.median(raw[MQ_WORKLOADS[0][0]][name]) for name, _ in MQ_BACKENDS}
    out = []
    for wl, per in raw.items():
        row: dict = {"bench (4 KiB rand read)": wl}
        for name, _ in MQ_BACKENDS:
            iops = statistics.median(per[name])
            row[f"{name} IOPS"] = round(iops)
            row[f"{name} / 1 queue"] = round(iops / one[name], 2)
            row[f"front-end CPU ({name})"] = f"{statistics.median(per[name + ' fe']):.0%}"
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
        row["ev/qsd io_uring"] = round(e["iops"] / q["iops"], 2)
        row["front-end CPU (ev io_uring)"] = f"{e['fe cpu']:.0%}"
        if "ev sync" in per:
            row["ev io_uring/ev sync"] = round(e["iops"] / per["ev sync"]["iops"], 2)
        out.append(row)
    return out


def run() -> list[dict]:
    return rows(measure())
