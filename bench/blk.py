"""vhost-user-blk back-ends driven by the synthetic front-end (no guest): edgevirt vs
qemu-storage-daemon on the same file, same front-end, same run.

The front-end is Python (edgevirt's VhostUserFrontend + DriverQueue): its own cost is in
every number, for both back-ends alike, so the ratio understates a faster back-end.
"""

from __future__ import annotations

import os
import random
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from edgevirt.backend.devices import blk as b
from edgevirt.backend.memory import store
from edgevirt.backend.transport.vhost_user.frontend import VhostUserFrontend
from edgevirt.backend.virtq.pyring import DESC_F_NEXT as NEXT
from edgevirt.backend.virtq.pyring import DESC_F_WRITE as WRITE

DISK = 256 << 20
QSIZE = 256


#: (image, scratch dir) -> (back-end process, its vhost-user socket)
Starter = Callable[[Path, Path], tuple[subprocess.Popen, str]]
#: name, queue depth, block, sequential, write, requests per round
Workload = tuple[str, int, int, bool, bool, int]


def edgevirt(opts: str, fastpath: bool = True) -> Starter:
    """``edgevirt backend run --device blk:path=IMAGE{opts}``; ``fastpath`` False: the
    Python request path (EDGEVIRT_BLK_FASTPATH=0)."""

    def start(disk: Path, d: Path) -> tuple[subprocess.Popen, str]:
        env = dict(os.environ, EDGEVIRT_BLK_FASTPATH="1" if fastpath else "0")
        sock_dir = d / f"ev{abs(hash((opts, fastpath)))}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgevirt", "backend", "run", "--log-level", "warning",
             "--device", f"blk:path={disk}{opts}", "--socket-dir", str(sock_dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env=env,
        )  # fmt: skip
        return proc, str(sock_dir / "0-blk.sock")

    return start


def qsd(blockdev: str, queues: int = 1) -> Starter:
    """qemu-storage-daemon exporting ``driver=file,filename=IMAGE,{blockdev}``."""

    def start(disk: Path, d: Path) -> tuple[subprocess.Popen, str]:
        sock = str(d / f"qsd{abs(hash((blockdev, queues)))}.sock")
        proc = subprocess.Popen(
            ["qemu-storage-daemon",
             "--blockdev", f"driver=file,node-name=f,filename={disk},{blockdev}",
             "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,"
             f"addr.path={sock},writable=on,num-queues={queues}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        return proc, sock

    return start


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads (/proc/PID/stat utime, stime)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_ns(pid: int) -> int:
    """On-CPU nanoseconds of a process, all its live threads (/proc/PID/task/*/schedstat):
    finer than :func:`cpu_seconds`' clock ticks for runs of a few hundred milliseconds."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # a thread that just ended
            pass
    return total


def measure(
    backends: list[tuple[str, Starter]],
    workloads: list[Workload],
    image: Path,
    d: Path,
    rounds: int = 3,
    **drive_kw: int,
) -> dict[str, dict[str, dict]]:
    """Every back-end runs at once (idle unless driven); each workload is driven ``rounds``
    times on every back-end in turn, the order rotated per round, so load from elsewhere on
    the machine spreads over all sides; each figure is the median of its rounds. Adds each
    back-end's own CPU per request ("be us/req", all its threads)."""
    procs: list[subprocess.Popen] = []
    raw: dict[str, dict[str, list[dict]]] = {}
    try:
        socks = []
        for name, start in backends:
            proc, sock = start(image, d)
            procs.append(proc)
            socks.append((name, sock, proc))
        for _name, sock, proc in socks:
            wait_socket(sock, proc)
        for wl, qd, block, seq, write, total in workloads:
            for r in range(rounds):
                for name, sock, proc in socks[r % len(socks) :] + socks[: r % len(socks)]:
                    if r == 0:
                        drive(sock, qd, block, seq, min(total, 300), write=write, **drive_kw)
                    c0 = cpu_seconds(proc.pid)
                    try:
                        res = drive(sock, qd, block, seq, total, write=write, **drive_kw)
                    except RuntimeError as e:
                        raise RuntimeError(f"{name}, {wl}, round {r}: {e}") from e
                    res["be us/req"] = (cpu_seconds(proc.pid) - c0) / total * 1e6
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


def wait_socket(path: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"back-end did not create {path}")
        time.sleep(0.02)


H = struct.Struct("<H")
Q = struct.Struct("<Q")
I32 = struct.Struct("<I")


class _Ring:
    """One queue of the synthetic driver: slot k owns descriptors 3k..3k+2."""

    def __init__(self, fe: VhostUserFrontend, index: int, base: int, qd: int, block: int,
                 write: bool, qsize: int) -> None:  # fmt: skip
        vr = fe.setup_vring(index, qsize, base=base)
        drv = vr.driver
        gpa0 = drv.mem.regions[0].gpa
        self.avail, self.used = drv.avail - gpa0, drv.used - gpa0
        self.kick, self.call, self.mask = vr.kick, vr.call, qsize - 1
        self.sector_at: list[int] = []
        self.status_at: list[int] = []
        for k in range(qd):
            hdr, data, status = drv.alloc(16), drv.alloc(block, align=4096), drv.alloc(1)
            drv.write_desc(3 * k, hdr, 16, NEXT, 3 * k + 1)
            drv.write_desc(3 * k + 1, data, block, NEXT | (0 if write else WRITE), 3 * k + 2)
            drv.write_desc(3 * k + 2, status, 1, WRITE, 0)
            drv.write(hdr, b.REQ_HEADER.pack(b.T_OUT if write else b.T_IN, 0, 0))
            if write:
                drv.write(data, os.urandom(block))
            self.sector_at.append(hdr - gpa0 + 8)
            self.status_at.append(status - gpa0)
        self.free = list(range(qd))
        self.started = [0.0] * qd
        self.avail_idx = self.used_seen = 0


def drive(
    sock: str,
    qd: int,
    block: int,
    sequential: bool,
    total: int,
    *,
    write: bool = False,
    qsize: int = QSIZE,
    disk: int = DISK,
    queues: int = 1,
) -> dict:
    """Keep ``qd`` reads (or writes) in flight on each of ``queues`` queues; return IOPS,
    MB/s and latency percentiles.

    The front-end is kept cheap so the back-end dominates: slot k owns descriptors
    3k..3k+2 (header, data, status), written once; per request only the header's sector and
    one avail ring entry are stored, straight into the shared mapping. Every status byte is
    checked.
    """
    if 3 * qd > qsize:
        raise ValueError(f"QD{qd} needs {3 * qd} descriptors, the ring has {qsize}")
    size = max(64 << 20, queues * (2 * qd * block + (8 << 20)))
    fe = VhostUserFrontend(sock, size=size, timeout=10)
    try:
        fe.negotiate()
        fe.set_mem_table()
        region = fe.mem.regions[0]
        buf = region.buf
        rings = [_Ring(fe, i, region.gpa + i * (size // queues), qd, block, write, qsize)
                 for i in range(queues)]  # fmt: skip
        by_call = {r.call: r for r in rings}
        rnd = random.Random(1)
        sectors = disk // 512 - block // 512
        pos = issued = wakes = 0
        lat: list[float] = []
        t0, c0 = time.perf_counter(), time.process_time()
        while len(lat) < total:
            for r in rings:
                if not r.free or issued >= total:
                    continue
                while r.free and issued < total:
                    k = r.free.pop()
                    if sequential:
                        sector, pos = pos, (pos + block // 512) % sectors
                    else:
                        sector = rnd.randrange(0, sectors // 8) * 8
                    Q.pack_into(buf, r.sector_at[k], sector)
                    H.pack_into(buf, r.avail + 4 + 2 * (r.avail_idx & r.mask), 3 * k)
                    r.avail_idx = (r.avail_idx + 1) & 0xFFFF
                    r.started[k] = time.perf_counter()
                    issued += 1
                # One store (x86 does not reorder stores): pack_into would zero the index
                # first, and a back-end reading then takes the ring for broken.
                store(buf, r.avail + 2, "H", r.avail_idx)
                os.eventfd_write(r.kick, 1)
            ready = select.select(list(by_call), [], [], 10)[0]
            if not ready:
                raise RuntimeError("back-end did not signal a used buffer within 10 s")
            wakes += 1
            now = time.perf_counter()
            for fd in ready:
                r = by_call[fd]
                os.eventfd_read(fd)
                used_idx = H.unpack_from(buf, r.used + 2)[0]
                while r.used_seen != used_idx:
                    k = I32.unpack_from(buf, r.used + 4 + 8 * (r.used_seen & r.mask))[0] // 3
                    if buf[r.status_at[k]] != b.S_OK:
                        raise RuntimeError(f"request of slot {k} failed: status "
                                           f"{buf[r.status_at[k]]}")  # fmt: skip
                    lat.append(now - r.started[k])
                    r.free.append(k)
                    r.used_seen = (r.used_seen + 1) & 0xFFFF
        elapsed = time.perf_counter() - t0
        fe_cpu = (time.process_time() - c0) / elapsed
    finally:
        fe.close()
    lat.sort()
    return {
        "fe cpu": fe_cpu,  # share of one core the front-end itself used: near 1 = its limit
        # completions per wake-up of the front-end: how the back-end batches its calls, which
        # sets how evenly the front-end can keep qd requests in flight
        "per wake": total / max(wakes, 1),
        "iops": total / elapsed,
        "MB/s": total * block / elapsed / 1e6,
        "p50 us": lat[len(lat) // 2] * 1e6,
        "p99 us": lat[int(len(lat) * 0.99)] * 1e6,
    }


WORKLOADS: list[Workload] = [
    ("4 KiB random read QD1", 1, 4096, False, False, 10000),
    ("4 KiB random read QD32", 32, 4096, False, False, 50000),
    ("64 KiB sequential read QD32", 32, 65536, True, False, 10000),
]
#: qsd with its defaults (aio=threads) on the page cache; edgevirt's default synchronous C
#: path (cache=writeback), the Python request path, and the io_uring engine on its own
#: thread over the page cache (cache=writeback,aio=io_uring).
BACKENDS: list[tuple[str, Starter]] = [
    ("qsd", qsd("cache.direct=off")),
    ("edgevirt", edgevirt("")),
    ("edgevirt Python path", edgevirt("", fastpath=False)),
    ("edgevirt io_uring", edgevirt(",aio=io_uring")),
]


def run(rounds: int = 3) -> list[dict]:
    """The page-cache case: a warm 256 MiB file, all back-ends at once, interleaved rounds."""
    if not shutil.which("qemu-storage-daemon"):
        raise RuntimeError("qemu-storage-daemon not found (apt-get install qemu-system-common)")
    with tempfile.TemporaryDirectory(prefix="edgevirt-bench-") as tmp:
        d = Path(tmp)
        disk = d / "disk.img"
        with open(disk, "wb") as f:
            for _ in range(DISK // (1 << 20)):
                f.write(os.urandom(1 << 20))  # allocated, in the page cache: warm
        results = measure(BACKENDS, WORKLOADS, disk, d, rounds)
    rows = []
    for wl, per in results.items():
        q = per["qsd"]
        row: dict = {"bench": wl}
        for name, m in per.items():
            row[f"{name} IOPS"] = round(m["iops"])
        for name in ("qsd", "edgevirt"):
            row[f"{name} p50/p99 us"] = f"{per[name]['p50 us']:.0f}/{per[name]['p99 us']:.0f}"
        for name, m in per.items():
            row[f"{name} CPU us/req"] = round(m["be us/req"], 1)
        for name, m in per.items():
            if name != "qsd":
                row[f"{name}/qsd"] = round(m["iops"] / q["iops"], 2)
        row["front-end CPU (edgevirt)"] = f"{per['edgevirt']['fe cpu']:.0%}"
        rows.append(row)
    return rows
