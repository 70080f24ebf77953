"""The blk request path in C (``SplitQueue.serve_blk``) against the Python BlockDevice path.

The production serve loop (``Vring.serve``) runs twice on identical guests, disks and
inflight regions, once with the fast path and once without: disk contents, guest memory
(status bytes, read data, used ring), ring indices, device statistics, inflight region and
errors must be identical, on random requests and on hostile chains (overlapping buffers,
buffers over the rings, split headers, short headers, no status byte, seg_max, readonly
disks, a short file, an fd that fails every call, corrupted descriptors).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgevirt.backend.devices import BlockDevice
from edgevirt.backend.devices import blk as b
from edgevirt.backend.memory import GuestMemory, Region
from edgevirt.backend.transport.vhost_user import vring as vring_mod
from edgevirt.backend.transport.vhost_user.backend import fastpath_enabled
from edgevirt.backend.transport.vhost_user.inflight import InflightQueue
from edgevirt.backend.transport.vhost_user.vring import Vring
from edgevirt.backend.virtq import IMPLEMENTATIONS, SERVE_BATCH
from edgevirt.backend.virtq.driver import DriverQueue
from edgevirt.errors import BackendError, RingError

pytestmark = pytest.mark.skipif("c" not in IMPLEMENTATIONS, reason="C extension not built")

GPA = 0x4000_0000
MEM = 256 << 10
SECTORS = 64
DISK = SECTORS * 512
QSIZE = 16

TYPES = [b.T_IN] * 6 + [b.T_OUT] * 6 + [b.T_FLUSH] * 2 + [b.T_GET_ID, b.T_DISCARD,
         b.T_WRITE_ZEROES, 2, 7, 0xFFFFFFFF]  # fmt: skip
SECTOR_CHOICES = [0, 1, 7, SECTORS - 8, SECTORS - 1, SECTORS, SECTORS + 1, 2**63, 2**64 - 1]
LENGTHS = [0, 512, 1024, 4096, 511, 513, 1, 8192]


def split(rng: random.Random, total: int, pieces: int) -> list[int]:
    """``total`` bytes in up to ``pieces`` non-empty parts."""
    if total == 0:
        return []
    cuts = sorted(rng.sample(range(1, total), min(pieces, total) - 1)) if total > 1 else []
    edges = [0, *cuts, total]
    return [edges[i + 1] - edges[i] for i in range(len(edges) - 1)]


def add_request(rng: random.Random, drv: DriverQueue) -> None:
    """One random, often malformed, blk request."""
    rtype = rng.choice(TYPES)
    sector = rng.choice(SECTOR_CHOICES) if rng.random() < 0.3 else rng.randrange(SECTORS)
    length = rng.choice(LENGTHS)
    pieces = rng.choice([1, 1, 1, 2, 3, 6])
    header = b.REQ_HEADER.pack(rtype, rng.choice([0, 0, 0, 7]), sector)
    hshape = rng.random()
    if hshape < 0.04:
        header = header[: rng.randrange(16)]  # short header (or none)
    readable = [header] if header else []
    if hshape > 0.85 and len(header) == 16:  # split across two buffers
        cut = rng.randrange(1, 16)
        readable = [header[:cut], header[cut:]]
    writable: list[int] = []
    if rtype in (b.T_DISCARD, b.T_WRITE_ZEROES):
        seg = b.DWZ_SEGMENT.pack(rng.randrange(SECTORS), rng.randrange(1, 9), rng.choice([0, 1]))
        readable.append(seg)
    elif (rtype == b.T_OUT) != (rng.random() < 0.1):  # data device-readable (sometimes wrong)
        parts = split(rng, length, pieces)
        data = rng.randbytes(length)
        pos = 0
        for n in parts:
            readable.append(data[pos : pos + n])
            pos += n
        if readable and rng.random() < 0.15 and len(readable) > 1:  # header + data merged
            readable[0:2] = [readable[0] + readable[1]]
    else:
        writable += split(rng, length, pieces)
    status = rng.random()
    if status < 0.75:
        writable.append(1)
    elif status < 0.85 and writable:
        writable[-1] += 1  # the status byte is the last byte of the last data buffer
    elif status < 0.95:
        writable.append(rng.choice([2, 16]))
    # else: no status byte at all
    if not readable and not writable:
        readable = [b"\0"]
    drv.add(readable, writable, indirect=rng.random() < 0.25, publish=False)


def corrupt(rng: random.Random, drv: DriverQueue, targets: list[int]) -> None:
    """Point a descriptor somewhere nasty: rings, other requests' buffers, or break a rule."""
    i = rng.randrange(drv.size)
    what = rng.random()
    if what < 0.6:  # overlap: a buffer over the desc table, the rings or another request
        drv.corrupt_desc(i, addr=rng.choice(targets))
    elif what < 0.8:
        drv.corrupt_desc(i, length=rng.choice([0, 1, 15, 16, 512, 0xFFFFFFFF]))
    else:
        drv.corrupt_desc(i, flags=rng.randrange(8), next=rng.randrange(drv.size + 2))


def run(seed: int, fast: bool, tmp: Path) -> list[Any]:
    rng = random.Random(seed)
    disk = tmp / f"disk-{int(fast)}.img"
    disk.write_bytes(random.Random(seed ^ 1).randbytes(DISK))
    readonly = rng.random() < 0.1
    dev = BlockDevice(str(disk), readonly=readonly, seg_max=rng.choice([1, 2, 4, 126, 126, 126]))
    variant = rng.random()
    pipe: tuple[int, int] | None = None
    if variant < 0.05:  # every read, write and flush fails (ESPIPE / EINVAL)
        pipe = os.pipe()
        os.close(dev.fd)
        dev.fd = pipe[0]
    elif variant < 0.12:  # the file shrank under the device: short reads
        os.truncate(disk, DISK // 2 + 512 * rng.randrange(4))
    mem = GuestMemory()
    mem.add(Region(GPA, MEM, bytearray(MEM)))
    drv = DriverQueue(mem, QSIZE, event_idx=rng.random() < 0.3)
    vr = Vring(0, num=QSIZE)
    vr.queue = drv.queue(IMPLEMENTATIONS["c"])
    inflight = InflightQueue(memoryview(bytearray(16 + 16 * QSIZE)), QSIZE)
    inflight.init(0)
    vr.inflight = inflight if rng.random() < 0.7 else None
    trace: list[Any] = []
    try:
        for _round in range(rng.randrange(1, 5)):
            drv.reset_data()
            drv.get_used()
            for _ in range(rng.randrange(1, QSIZE + 1)):
                try:
                    add_request(rng, drv)
                except ValueError:  # out of free descriptors: chains still in flight
                    break
            drv.publish()
            data = drv.data_start + rng.randrange(drv._next_data - drv.data_start + 1)
            targets = [drv.desc, drv.avail, drv.used, drv.desc + 16 * rng.randrange(QSIZE), data]
            for _ in range(rng.choice([0, 0, 0, 1, 2])):
                corrupt(rng, drv, targets)
            try:
                vr.serve(dev, mem, fastpath=fast)
                outcome: tuple[Any, ...] = ("ok",)
            except BackendError as e:
                outcome = ("error", type(e).__name__, getattr(e, "rule", None), str(e))
            q = vr.queue
            s = dev.stats
            trace.append((
                outcome, q.last_avail_idx, q.used_idx, q.broken, vr.stats.served,
                (s.requests, s.bytes_read, s.bytes_written, s.errors, s.by_type),
                bytes(mem.regions[0].buf), bytes(inflight.buf), inflight.counter,
                disk.read_bytes(),
            ))  # fmt: skip
            if outcome[0] == "error":
                break
    finally:
        dev.close()
        if pipe is not None:
            os.close(pipe[1])
    return trace


def differential(seed: int, tmp: Path, batch: int) -> None:
    old = vring_mod.BATCH
    vring_mod.BATCH = batch
    try:
        fast, slow = run(seed, True, tmp), run(seed, False, tmp)
    finally:
        vring_mod.BATCH = old
    assert len(fast) == len(slow)
    for k, (f, s) in enumerate(zip(fast, slow, strict=True)):
        for name, x, y in zip(FIELDS, f, s, strict=True):
            assert x == y, f"round {k}: {name} differs"


def test_differential_catches_a_divergence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison can fail: a Python path that skips the capacity check is caught."""
    strict = BlockDevice._in_range
    monkeypatch.setattr(BlockDevice, "_in_range",
                        lambda self, s, n, r=0: r == 0 or strict(self, s, n, r))  # fmt: skip
    caught = 0
    for seed in range(60):
        try:
            differential(seed, tmp_path, 64)
        except (AssertionError, OverflowError, OSError):  # a diff, or Python's huge offset
            caught += 1
    assert caught


FIELDS = ["outcome", "last_avail_idx", "used_idx", "broken", "served", "stats", "guest memory",
          "inflight region", "inflight counter", "disk"]  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(0, 2**32), st.sampled_from([64, 64, 3, 1]))
def test_differential_fast_and_python_path(tmp_path_factory: Any, seed: int, batch: int) -> None:
    differential(seed, tmp_path_factory.mktemp("d"), batch)


def test_differential_covers_the_interesting_outcomes(tmp_path: Path) -> None:
    """The generator reaches served batches, handed-back chains, status errors and each kind
    of queue error, so the differential test compares more than empty runs."""
    seen: set[str] = set()
    for seed in range(150):
        for k, t in enumerate(run(seed, True, tmp_path)):
            outcome, stats = t[0], t[5]
            seen.add(outcome[2] or outcome[1] if outcome[0] == "error" else "ok")
            if stats[3]:
                seen.add("status errors")
            if set(stats[4]) - {"read", "write", "flush"}:
                seen.add("handed back")
            if k:
                seen.add("several rounds")
    want = {"ok", "status errors", "handed back", "several rounds", "BackendError",
            "zero_len", "GuestMemoryError"}  # fmt: skip
    assert want <= seen, want - seen


# ---- direct checks of serve_blk ----


def setup_queue(tmp_path: Path, **kw: Any) -> tuple[GuestMemory, DriverQueue, Any, BlockDevice]:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(range(256)) * (DISK // 256))
    dev = BlockDevice(str(disk), **kw)
    mem = GuestMemory()
    mem.add(Region(GPA, MEM, bytearray(MEM)))
    drv = DriverQueue(mem, QSIZE)
    return mem, drv, drv.queue(IMPLEMENTATIONS["c"]), dev


def fast(dev: BlockDevice) -> tuple[int, int, int, bool]:
    args = dev.fast_path_args()
    assert args is not None
    return args


def test_serve_blk_serves_a_batch_in_c(tmp_path: Path) -> None:
    mem, drv, q, dev = setup_queue(tmp_path)
    heads = [drv.add([b.REQ_HEADER.pack(b.T_IN, 0, 8 * i)], [4096, 1], publish=False)
             for i in range(3)]  # fmt: skip
    drv.add([b.REQ_HEADER.pack(b.T_OUT, 0, 0), b"\xaa" * 512], [1], publish=False)
    drv.add([b.REQ_HEADER.pack(b.T_FLUSH, 0, 0)], [1])
    region = bytearray(16 + 16 * QSIZE)
    res = q.serve_blk(mem, *fast(dev), 0, region, 5)
    assert res.pushed == 5 and res.done == [] and res.rest == []
    assert (res.reads, res.writes, res.flushes, res.errors) == (3, 1, 1, 0)
    assert (res.bytes_written, res.bytes_read, res.counter, res.error) == (3 * 4096, 512, 10, None)
    used = drv.get_used()
    assert [h for h, _ in used[:3]] == heads and [n for _, n in used] == [4097] * 3 + [1, 1]
    assert q.used_idx == q.last_avail_idx == 5
    assert region[8:16] == bytes([1, 0, QSIZE, 0, used[-1][0], 0, 5, 0])  # header
    assert all(region[16 + 16 * h] == 0 for h in range(QSIZE))  # all completed
    with open(dev.path, "rb") as f:
        assert f.read(512) == b"\xaa" * 512
    dev.close()


@pytest.mark.parametrize("event_idx", [False, True])
def test_serve_blk_notify_is_should_notify_and_pending(tmp_path: Path, event_idx: bool) -> None:
    """serve_blk(notify=True) answers what should_notify() and pending() would after the
    same batch (twin queues, one driven each way), with used_event and NO_INTERRUPT varied."""
    rng = random.Random(7)
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(DISK))
    twins = []
    for _ in range(2):
        mem = GuestMemory()
        mem.add(Region(GPA, MEM, bytearray(MEM)))
        drv = DriverQueue(mem, QSIZE, event_idx=event_idx)
        dev = BlockDevice(str(disk))
        twins.append((mem, drv, drv.queue(IMPLEMENTATIONS["c"]), dev))
    seen = set()
    for rnd in range(40):
        n, batch = rng.randrange(0, 6), rng.choice([0, 1, 2, 4])
        flags, used_event = rng.choice([0, 0, 1]), rng.randrange(3 * rnd + 1)
        got = []
        for k, (mem, drv, q, dev) in enumerate(twins):
            drv.reset_data()
            for i in range(n):
                drv.add([b.REQ_HEADER.pack(b.T_IN, 0, 8 * i)], [512, 1], publish=False)
            drv.publish()
            drv.set_avail_flags(flags)
            drv.set_used_event(used_event & 0xFFFF)
            if k == 0:
                res = q.serve_blk(mem, *fast(dev), batch, notify=True)
                got.append((res.pushed, bool(res.notified), res.pending))
            else:
                res = q.serve_blk(mem, *fast(dev), batch)
                notified = bool(res.pushed) and q.should_notify(mem)
                q.set_notification(mem, True)
                got.append((res.pushed, notified, q.pending(mem)))
            assert res.rest == []
            q.serve_blk(mem, *fast(dev), 0)  # the rest, so the next round starts empty
            drv.get_used()
        assert got[0] == got[1], f"round {rnd}"
        assert got[0][2] == n - got[0][0]
        seen.add((got[0][1], got[0][2] > 0))
    assert seen == {(a, b) for a in (True, False) for b in (True, False)}, seen
    for _mem, _drv, _q, dev in twins:
        dev.close()


def test_serve_blk_hands_back_what_it_does_not_serve(tmp_path: Path) -> None:
    mem, drv, q, dev = setup_queue(tmp_path)
    h0 = drv.add([b.REQ_HEADER.pack(b.T_IN, 0, 0)], [512, 1], publish=False)
    h1 = drv.add([b.REQ_HEADER.pack(b.T_GET_ID, 0, 0)], [20, 1], publish=False)
    h2 = drv.add([b.REQ_HEADER.pack(b.T_IN, 0, 0)], [512, 1])
    res = q.serve_blk(mem, *fast(dev))
    assert res.pushed == 0 and res.done == [(h0, 513)]
    assert [c[0] for c in res.rest] == [h1, h2] and res.reads == 1
    assert q.last_avail_idx == 3 and q.used_idx == 0 and drv.get_used() == []
    dev.close()


def test_serve_blk_walk_errors_break_the_queue_before_any_io(tmp_path: Path) -> None:
    mem, drv, q, dev = setup_queue(tmp_path)
    drv.add([b.REQ_HEADER.pack(b.T_OUT, 0, 0), b"\x55" * 512], [1], publish=False)
    drv.add([b.REQ_HEADER.pack(b.T_OUT, 0, 0)], [1])
    drv.corrupt_desc(3, length=0)
    with pytest.raises(RingError) as exc:
        q.serve_blk(mem, *fast(dev))
    assert exc.value.rule == "zero_len" and q.broken is not None
    assert Path(dev.path).read_bytes()[:512] == bytes(range(256)) * 2
    with pytest.raises(RingError, match="broken"):
        q.serve_blk(mem, *fast(dev))
    dev.close()


@pytest.mark.parametrize(
    "args",
    [
        (-1, 1, 126, False),
        (3, 1, 0, False),
        (3, 1, 1025, False),
        (3, 2**62, 126, False),
    ],
)
def test_serve_blk_argument_errors_do_not_break(tmp_path: Path, args: tuple[Any, ...]) -> None:
    mem, drv, q, dev = setup_queue(tmp_path)
    with pytest.raises(ValueError):
        q.serve_blk(mem, *args)
    with pytest.raises(ValueError, match="inflight region"):
        q.serve_blk(mem, *fast(dev), 0, bytearray(16 * QSIZE))
    with pytest.raises(BufferError):
        q.serve_blk(mem, *fast(dev), 0, b"read-only")
    assert q.broken is None
    dev.close()


def test_serve_blk_releases_guest_buffers(tmp_path: Path) -> None:
    """The mmap can be closed after the call: every Py_buffer was released."""
    import mmap

    mem, drv, q, dev = setup_queue(tmp_path)
    m = mmap.mmap(-1, MEM)
    m[:] = bytes(mem.regions[0].buf)
    mem.regions[0].buf = m
    drv.add([b.REQ_HEADER.pack(b.T_IN, 0, 0)], [512, 1])
    region = bytearray(16 + 16 * QSIZE)
    assert q.serve_blk(mem, *fast(dev), 0, region).pushed == 1
    m.close()
    region.extend(b"x")  # resizable again: its buffer was released too
    dev.close()


def test_env_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEVIRT_BLK_FASTPATH", raising=False)
    assert fastpath_enabled()
    for off in ("0", "off", "false", "no"):
        monkeypatch.setenv("EDGEVIRT_BLK_FASTPATH", off)
        assert not fastpath_enabled()


def test_vring_uses_the_fast_path_only_when_asked(tmp_path: Path) -> None:
    mem, drv, q, dev = setup_queue(tmp_path)
    calls: list[Any] = []
    orig = dev.handle

    def handle(*a: Any) -> int:
        calls.append(a)
        return orig(*a)

    dev.handle = handle  # type: ignore[method-assign,assignment]
    vr = Vring(0, num=QSIZE, queue=q)
    drv.add([b.REQ_HEADER.pack(b.T_IN, 0, 0)], [512, 1])
    vr.serve(dev, mem, fastpath=True)
    assert calls == [] and dev.stats.by_type == {"read": 1} and vr.stats.served == 1
    drv.add([b.REQ_HEADER.pack(b.T_IN, 0, 0)], [512, 1])
    vr.serve(dev, mem, fastpath=False)
    assert len(calls) == 1 and dev.stats.by_type == {"read": 2} and vr.stats.served == 2
    dev.close()


def test_a_burst_is_published_one_serve_batch_at_a_time(tmp_path: Path) -> None:
    """32 reads made available at once are pushed and signalled SERVE_BATCH at a time, so a
    driver on another CPU takes the first completions while the rest are served (one push
    for the whole burst measured at half the page-cache IOPS: bench/RESULTS.md)."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(random.Random(3).randbytes(DISK))
    dev = BlockDevice(str(disk))
    mem = GuestMemory()
    mem.add(Region(GPA, MEM, bytearray(MEM)))
    drv = DriverQueue(mem, 128)  # no EVENT_IDX: every push that moves used idx signals
    vr = Vring(0, num=128)
    vr.queue = drv.queue(IMPLEMENTATIONS["c"])
    vr.call = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        n = 4 * SERVE_BATCH
        heads = [drv.add([b.REQ_HEADER.pack(b.T_IN, 0, i)], [512, 1], publish=False)
                 for i in range(n)]  # fmt: skip
        drv.publish()
        vr.serve(dev, mem, fastpath=True)
        assert os.eventfd_read(vr.call) == vr.stats.notifications == n // SERVE_BATCH
        assert sorted(h for h, _ in drv.get_used()) == sorted(heads)
    finally:
        vr.close_fds()
        dev.close()
