"""The asynchronous blk request path (``BlkAio``: io_uring and the thread pool, O_DIRECT)
against the Python BlockDevice path.

The production serve loop (``Vring.serve`` + ``Vring.reap``; for ``+msg`` the virtio-msg
transport's ``MsgDevice.serve`` and its engine reaping) runs on identical guests and disks,
once through BlkAio on an ``O_DIRECT`` image (``cache=none``) and once through
``BlockDevice.handle`` on the page cache. Requests of one round touch disjoint sectors (the
async path completes in any order, as the spec allows), so the disk, the guest memory (data,
status bytes), the set of used entries, ring indices, statistics and the inflight region must
match. Malformed requests (beyond capacity, partial sectors, data on the wrong side, readonly
disks, unknown types) are in the mix; hostile chains are checked for safety separately.
"""

from __future__ import annotations

import mmap
import os
import random
import select
import time
from pathlib import Path
from typing import Any

import pytest

from edgevirt.backend.devices import BlockDevice, parse_device
from edgevirt.backend.devices import blk as b
from edgevirt.backend.memory import GuestMemory, Region
from edgevirt.backend.transport.vhost_user.inflight import InflightQueue
from edgevirt.backend.transport.vhost_user.vring import Vring
from edgevirt.backend.transport.virtio_msg import protocol as mp
from edgevirt.backend.transport.virtio_msg.device import MsgDevice
from edgevirt.backend.transport.virtio_msg.protocol import MsgId
from edgevirt.backend.virtq import IMPLEMENTATIONS, BlkAio
from edgevirt.backend.virtq.driver import DriverQueue
from edgevirt.errors import BackendError, ConfigError, RingError
from tests.helpers import no_uring, odirect_dir

pytestmark = pytest.mark.skipif(BlkAio is None, reason="C extension not built")

GPA = 0x4000_0000
MEM = 512 << 10
SECTORS = 256
DISK = SECTORS * 512
QSIZE = 32


NO_URING = no_uring()
_uring = pytest.mark.skipif(NO_URING is not None, reason=f"no io_uring here: {NO_URING}")
ENGINES = [pytest.param("io_uring", marks=_uring), "threads"]
#: the engine's own serving thread (what the back-end runs), on either engine
THREADED = [pytest.param("io_uring+thread", marks=_uring), "threads+thread"]
#: the virtio-msg transport's device side, submitting on EVENT_AVAIL, reaping on the eventfd
MSG = [pytest.param("io_uring+msg", marks=_uring), "threads+msg"]


class Readers:
    """The part of the event loop MsgDevice uses: fds and their callbacks, run by hand."""

    def __init__(self) -> None:
        self.fds: dict[int, Any] = {}

    def add_reader(self, fd: int, callback: Any) -> None:
        self.fds[fd] = callback

    def remove_reader(self, fd: int) -> None:
        self.fds.pop(fd, None)


def msg_device(dev: BlockDevice, mem: GuestMemory, drv: DriverQueue, loop: Readers) -> MsgDevice:
    """A virtio-msg device with its queue 0 set up on ``drv``'s rings and DRIVER_OK."""
    mdev = MsgDevice(0, dev, mem, loop)  # type: ignore[arg-type]
    mdev.driver_features = 1 << 32 | (1 << 29 if drv.event_idx else 0)
    mdev.status = mp.STATUS_FEATURES_OK | mp.STATUS_DRIVER_OK
    vq = {
        "index": 0,
        "reserved0": 0,
        "size": drv.size,
        "reserved1": 0,
        "desc": drv.desc,
        "driver": drv.avail,
        "device": drv.used,
    }
    mdev.handle(mp.request(MsgId.SET_VQUEUE, 0, 1, **vq))
    return mdev


def serve_msg(mdev: MsgDevice, loop: Readers, drv: DriverQueue) -> None:
    """EVENT_AVAIL until the device has taken everything, then reap as the loop would."""
    while mdev.serve(0)[1]:
        pass
    deadline = time.monotonic() + 10
    while mdev.vqs[0].aio is not None and mdev.vqs[0].aio.in_flight:
        assert time.monotonic() < deadline, "the engine did not complete the requests"
        for fd in select.select(list(loop.fds), [], [], 0.01)[0]:
            loop.fds[fd]()


@pytest.fixture
def ddir(tmp_path: Path) -> Path:
    """A directory on a file system with O_DIRECT (tmpfs has none): tmp, else the repo."""
    d = odirect_dir(tmp_path)
    if d is None:
        pytest.skip("no file system with O_DIRECT here")
    return d


def split(rng: random.Random, total: int) -> list[int]:
    """``total`` bytes in 1..4 parts, often not multiples of 512 (unaligned buffers)."""
    if total <= 1:
        return [total] if total else []
    cuts = sorted(rng.sample(range(1, total), min(rng.choice([0, 0, 1, 3]), total - 1)))
    edges = [0, *cuts, total]
    return [edges[i + 1] - edges[i] for i in range(len(edges) - 1)]


def add_round(rng: random.Random, drv: DriverQueue, readonly_ok: bool) -> None:
    free = list(range(0, SECTORS, 8))
    rng.shuffle(free)
    for _ in range(rng.randrange(1, QSIZE // 2)):
        kind = rng.choice(["read"] * 4 + ["write"] * 4 + ["flush", "get_id", "bad"])
        sector = free.pop() if free else 0
        nsec = rng.choice([1, 1, 2, 8])
        if kind == "bad":
            rtype = rng.choice([b.T_IN, b.T_OUT, b.T_FLUSH])
            sector = rng.choice([SECTORS, SECTORS - 1, 2**63, sector])
            length = rng.choice([511, 513, 4096])
            if rtype == b.T_FLUSH or rng.random() < 0.3:  # data on the wrong side
                readable = [b.REQ_HEADER.pack(rtype, 0, sector), bytes(length)]
                writable = [1]
            elif rtype == b.T_IN:
                readable, writable = [b.REQ_HEADER.pack(rtype, 0, sector)], [length, 1]
            else:
                readable, writable = [b.REQ_HEADER.pack(rtype, 0, sector), bytes(length)], [1]
        elif kind == "read":
            readable = [b.REQ_HEADER.pack(b.T_IN, 0, sector)]
            writable = [*split(rng, 512 * nsec), 1]
        elif kind == "write":
            data = rng.randbytes(512 * nsec)
            parts, pos = split(rng, len(data)), 0
            readable = [b.REQ_HEADER.pack(b.T_OUT, 0, sector)]
            for n in parts:
                readable.append(data[pos : pos + n])
                pos += n
            if rng.random() < 0.2:  # header and data in one buffer
                readable[0:2] = [readable[0] + readable[1]]
            writable = [1]
        elif kind == "flush":
            readable, writable = [b.REQ_HEADER.pack(b.T_FLUSH, 0, 0)], [1]
        else:
            readable, writable = [b.REQ_HEADER.pack(b.T_GET_ID, 0, 0)], [20, 1]
        try:
            drv.add(readable, writable, indirect=rng.random() < 0.25, publish=False)
        except ValueError:  # out of descriptors
            break
    drv.publish()


def run(seed: int, engine: str | None, d: Path, tracked: bool = True) -> list[Any]:
    """``engine`` None: the Python path on the page cache; else BlkAio with O_DIRECT.
    ``tracked`` False: no inflight region (virtio-msg has none)."""
    rng = random.Random(seed)
    disk = d / f"disk-{engine}.img"
    disk.write_bytes(random.Random(seed ^ 1).randbytes(DISK))
    readonly = rng.random() < 0.15
    aio = (engine or "sync").removesuffix("+thread").removesuffix("+msg")
    dev = BlockDevice(str(disk), readonly=readonly, cache="none" if engine else "writeback",
                      aio=aio, seg_max=rng.choice([2, 126]))  # fmt: skip
    if rng.random() < 0.5:  # as on a host whose DIO buffers must be 512-aligned: bounces
        dev.mem_align = 512
    mem = GuestMemory()
    mem.add(Region(GPA, MEM, bytearray(MEM)))
    drv = DriverQueue(mem, QSIZE, event_idx=rng.random() < 0.3)
    vr = Vring(0, num=QSIZE)
    vr.queue = drv.queue(IMPLEMENTATIONS["c"])
    msg = engine is not None and engine.endswith("+msg")
    if msg:
        loop = Readers()
        mdev = msg_device(dev, mem, drv, loop)
        vr.queue = mdev.vqs[0].queue
        assert mdev.vqs[0].aio.engine == aio
    elif engine not in (None, "sync"):
        vr.aio, vr.blk = dev.open_aio(QSIZE, BlkAio), dev
        assert vr.aio.engine == engine.removesuffix("+thread")
        if engine.endswith("+thread"):
            vr.threaded = True
            vr.kick = os.eventfd(0, os.EFD_NONBLOCK)
            vr.call = os.eventfd(0, os.EFD_NONBLOCK)
    inflight = InflightQueue(memoryview(bytearray(16 + 16 * QSIZE)), QSIZE)
    inflight.init(0)
    vr.inflight = inflight if rng.random() < 0.7 and tracked else None
    trace: list[Any] = []
    used_lo, used_hi = drv.used - GPA + 4, drv.used - GPA + 4 + 8 * QSIZE
    try:
        for _round in range(rng.randrange(1, 4)):
            drv.reset_data()
            add_round(rng, drv, readonly)
            if msg:
                serve_msg(mdev, loop, drv)
                vr.stats.served = mdev.vqs[0].served
            elif vr.threaded:
                serve_threaded(vr, dev, mem, drv)
            else:
                vr.serve(dev, mem, fastpath=engine is not None)
                vr.reap(mem, wait=True)
            q = vr.queue
            s = dev.stats
            guest = bytearray(mem.regions[0].buf)
            guest[used_lo:used_hi] = bytes(used_hi - used_lo)  # order differs: compared as a set
            infl = bytearray(inflight.buf)
            infl[12:14] = b"\0\0"  # last_batch_head: the last published, order-dependent
            by_type = {k: v for k, v in s.by_type.items() if k != "bounced"}
            trace.append((
                q.last_avail_idx, q.used_idx, q.broken, vr.stats.served,
                (s.requests, s.bytes_read, s.bytes_written, s.errors, by_type),
                bytes(guest), sorted(drv.get_used()), bytes(infl), inflight.counter,
                disk.read_bytes(),
            ))  # fmt: skip
            drv._free.sort()  # the next round's descriptors must not depend on used order
        if vr.aio is not None:
            assert vr.aio.in_flight == 0
        if engine is not None:
            trace.append(("bounced", s.by_type.get("bounced", 0)))
    finally:
        if msg:
            mdev.reset()
            assert mdev.vqs[0].aio is None and not loop.fds
            vr.queue = None
        vr.stop(mem)
        dev.close()
        vr.close_fds()
    return trace


def serve_threaded(vr: Vring, dev: BlockDevice, mem: GuestMemory, drv: DriverQueue) -> None:
    """Let the engine's thread serve what the driver published (kicked, as a driver does),
    answer the chains it hands to Python, then take the ring back (its state then reads as
    the loop thread's would)."""
    if vr.aio.running:
        os.eventfd_write(vr.kick, 1)
    else:
        vr.serve(dev, mem)
    deadline = time.monotonic() + 10
    while drv.used_idx != drv.avail_idx and not vr.aio.broken:
        assert time.monotonic() < deadline, "the engine thread did not serve the ring"
        if select.select([vr.aio.wakeup_fd], [], [], 0.01)[0]:
            vr.wakeup(dev, mem)
    vr.pause(mem)


FIELDS = ["last_avail_idx", "used_idx", "broken", "served", "stats", "guest memory",
          "used entries", "inflight region", "inflight counter", "disk"]  # fmt: skip


@pytest.mark.parametrize("engine", [*ENGINES, *THREADED, *MSG, "sync"])
def test_differential_async_odirect_and_python(ddir: Path, engine: str) -> None:
    """``sync``: cache=none served by serve_blk on the O_DIRECT fd, the page-cache fd taking
    what O_DIRECT refuses. ``+msg``: the virtio-msg transport (no inflight region)."""
    bounced = 0
    tracked = not engine.endswith("+msg")
    for seed in range(40):
        ref = run(seed, None, ddir, tracked)
        got = run(seed, engine, ddir, tracked)
        bounced += got.pop()[1]
        assert len(ref) == len(got)
        for k, (x, y) in enumerate(zip(ref, got, strict=True)):
            for name, u, v in zip(FIELDS, x, y, strict=True):
                assert u == v, f"seed {seed} round {k}: {name} differs"
    assert bounced or engine == "sync"  # the aio runs had unaligned buffers to bounce


@_uring
def test_differential_catches_a_divergence(ddir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison can fail: an async side whose capacity check is off by 8 sectors (it
    serves reads past the end of the file) is caught."""
    refs = [run(seed, None, ddir) for seed in range(20)]
    orig = BlockDevice.__init__

    def wrong(self: BlockDevice, path: str, **kw: Any) -> None:
        orig(self, path, **kw)
        self.capacity += 8  # claims sectors the file does not have

    monkeypatch.setattr(BlockDevice, "__init__", wrong)
    gots = [run(seed, "io_uring", ddir)[:-1] for seed in range(20)]
    assert any(r != g for r, g in zip(refs, gots, strict=True))


# ---- direct checks ----


def setup(
    d: Path, engine: str = "auto", **kw: Any
) -> tuple[GuestMemory, DriverQueue, Any, BlockDevice, Any]:
    disk = d / "disk.img"
    disk.write_bytes(bytes(range(256)) * (DISK // 256))
    dev = BlockDevice(str(disk), cache="none", aio=engine, **kw)
    mem = GuestMemory()
    mem.add(Region(GPA, MEM, mmap.mmap(-1, MEM)))  # page aligned, as a guest's RAM
    drv = DriverQueue(mem, QSIZE)
    q = drv.queue(IMPLEMENTATIONS["c"])
    return mem, drv, q, dev, dev.open_aio(QSIZE, BlkAio)


def flush_round(drv: DriverQueue, rnd: int, serve: Any) -> None:
    """6 writes, a flush, 4 reads in one publish; ``serve()`` completes them all; the
    flush's used entry must follow every write."""
    writes = [drv.add([b.REQ_HEADER.pack(b.T_OUT, 0, 8 * i), bytes([rnd + i]) * 4096], [1],
                      publish=False) for i in range(6)]  # fmt: skip
    flush = drv.add([b.REQ_HEADER.pack(b.T_FLUSH, 0, 0)], [1], publish=False)
    reads = [drv.add([b.REQ_HEADER.pack(b.T_IN, 0, 8 * i)], [4096, 1], publish=False)
             for i in range(4)]  # fmt: skip
    drv.publish()
    serve()
    order = [h for h, _ in drv.get_used()]
    assert order.index(flush) > max(order.index(w) for w in writes)
    assert sorted(order) == sorted([*writes, flush, *reads])
    drv.reset_data()


@pytest.mark.parametrize("engine", ENGINES)
def test_flush_completes_after_every_earlier_write(ddir: Path, engine: str) -> None:
    """A flush is a barrier: its used entry follows every write submitted before it."""
    mem, drv, q, dev, aio = setup(ddir, engine)

    def serve() -> None:
        res = aio.submit(q, mem, 0)
        assert (res.writes, res.flushes, res.reads, res.pushed, res.rest) == (6, 1, 4, 0, [])
        assert aio.in_flight == 11
        aio.reap(q, None, True)

    for rnd in range(5):
        flush_round(drv, rnd, serve)
    data = Path(dev.path).read_bytes()
    assert all(data[4096 * i : 4096 * (i + 1)] == bytes([4 + i]) * 4096 for i in range(6))
    aio.close()
    dev.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_flush_ordering_over_virtio_msg(ddir: Path, engine: str) -> None:
    """The same barrier through the virtio-msg transport's engine: one EVENT_AVAIL submits
    writes, a flush and reads; completions come back through the engine's eventfd."""
    mem, drv, q, dev, aio = setup(ddir, engine)
    aio.close()
    loop = Readers()
    mdev = msg_device(dev, mem, drv, loop)
    assert mdev.snapshot()["queues"][0]["io"] == engine

    def serve() -> None:
        assert mdev.serve(0) == (False, False)  # all in flight: nothing to notify yet
        assert mdev.vqs[0].aio.in_flight == 11
        serve_msg(mdev, loop, drv)

    for rnd in range(3):
        flush_round(drv, rnd, serve)
    by_type = {k: v for k, v in dev.stats.by_type.items() if k != "bounced"}
    assert by_type == {"write": 18, "flush": 3, "read": 12}
    mdev.close()
    assert not loop.fds and Path(dev.path).read_bytes()[:4096] == bytes([2]) * 4096


def test_unaligned_buffers_are_bounced_and_counted(
    ddir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(b, "dio_alignment", lambda fd: (512, 512))
    mem, drv, q, dev, aio = setup(ddir)
    payload = os.urandom(1024)
    w = drv.add([b.REQ_HEADER.pack(b.T_OUT, 0, 2), payload[:100], payload[100:]], [1],
                publish=False)  # fmt: skip
    drv._next_data = (drv._next_data + 511) // 512 * 512 + 496  # header, then data at 512k
    r_al = drv.add([b.REQ_HEADER.pack(b.T_IN, 0, 0)], [512, 1], publish=False)  # aligned
    r_un = drv.add([b.REQ_HEADER.pack(b.T_IN, 0, 2)], [300, 724, 1])
    (addr, n, _f, _n), (addr2, n2, _f, _n) = (drv.read_desc(i) for i in drv._chains[r_un][1:3])
    res = aio.submit(q, mem)
    assert res.bounced == 2 and aio.bounced == 2  # the write and the split read
    aio.reap(q, None, True)
    assert sorted(drv.get_used()) == sorted([(w, 1), (r_al, 513), (r_un, 1025)])
    assert drv.read(addr, n) + drv.read(addr2, n2) == payload  # written, then read back
    assert Path(dev.path).read_bytes()[1024:2048] == payload
    aio.close()
    dev.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_bounce_memory_in_flight_is_bounded(ddir: Path, engine: str) -> None:
    """Past the bounce budget an unaligned request goes through the page-cache fd (no
    allocation); without one it is answered IOERR, naming why."""
    disk = ddir / "b.img"
    disk.write_bytes(bytes(DISK))
    fd_direct = os.open(disk, os.O_RDWR | os.O_DIRECT)
    fd = os.open(disk, os.O_RDWR)
    mem = GuestMemory()
    mem.add(Region(GPA, MEM, mmap.mmap(-1, MEM)))
    try:
        for buffered, budget in ((fd, 0), (fd, 4096), (-1, 0)):
            drv = DriverQueue(mem, QSIZE)
            q = drv.queue(IMPLEMENTATIONS["c"])
            aio = BlkAio(fd_direct, SECTORS, 126, False, QSIZE, engine=engine, direct=True,
                         mem_align=512, fd_buffered=buffered, bounce_budget=budget)  # fmt: skip
            datas = [bytes([budget % 251 + i + 1]) * 4096 for i in range(4)]
            for i, data in enumerate(datas):  # 16-byte aligned buffers: all need a bounce
                drv.add([b.REQ_HEADER.pack(b.T_OUT, 0, 8 * i), data], [1], publish=False)
            drv.publish()
            res = aio.submit(q, mem)
            assert res.bounced == 4
            aio.reap(q, None, True)
            aio.close()
            image = disk.read_bytes()
            if buffered >= 0:
                assert all(image[4096 * i : 4096 * (i + 1)] == d for i, d in enumerate(datas))
            else:
                assert res.errors == 4 and "bounce buffer" in (res.error or "")
                assert all(drv.read(addr, 1) == b"\1" for addr in status_bytes(drv, 4))
    finally:
        os.close(fd_direct)
        os.close(fd)


def status_bytes(drv: DriverQueue, n: int) -> list[int]:
    """Addresses of the status bytes of the first n chains the driver has out."""
    out = []
    for head in sorted(drv._chains)[:n]:
        addr, length, _f, _n = drv.read_desc(drv._chains[head][-1])
        out.append(addr + length - 1)
    return out


def test_unaligned_offset_goes_through_the_page_cache(
    ddir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a 4 KiB DIO alignment a 512-byte request at sector 1 cannot use O_DIRECT."""
    monkeypatch.setattr(b, "dio_alignment", lambda fd: (4096, 4096))
    mem, drv, q, dev, aio = setup(ddir)
    assert b.CONFIG.unpack(dev.config())[6] == 4096  # blk_size advertised
    drv.add([b.REQ_HEADER.pack(b.T_OUT, 0, 1), b"\x5a" * 512], [1])
    aio.submit(q, mem)
    aio.reap(q, None, True)
    assert drv.get_used()[0][1] == 1 and dev.stats.errors == 0
    assert Path(dev.path).read_bytes()[512:1024] == b"\x5a" * 512
    aio.close()
    dev.close()


def test_head_made_available_twice_breaks_the_queue(ddir: Path) -> None:
    mem, drv, q, dev, aio = setup(ddir)
    h = drv.add([b.REQ_HEADER.pack(b.T_IN, 0, 0)], [4096, 1])
    aio.submit(q, mem)
    drv.make_available(h)  # again, while its read may still be in flight
    if aio.in_flight:
        with pytest.raises(RingError, match="in flight") as exc:
            aio.submit(q, mem)
        assert exc.value.rule == "head_in_flight" and q.broken is not None
    aio.reap(q, None, True)  # the I/O ends; nothing published on a broken queue
    assert aio.in_flight == 0
    aio.close()
    dev.close()


def test_memory_stays_held_while_io_is_in_flight(ddir: Path) -> None:
    """The guest buffers are held until the last request is reaped, then released."""
    mem, drv, q, dev, aio = setup(ddir, "threads")
    m = mem.regions[0].buf
    for i in range(8):
        drv.add([b.REQ_HEADER.pack(b.T_IN, 0, 8 * i)], [4096, 1], publish=False)
    drv.publish()
    aio.submit(q, mem)
    if aio.in_flight:
        with pytest.raises(BufferError):
            m.close()
        with pytest.raises(RuntimeError, match="new guest memory"):
            aio.submit(q, GuestMemory())
    aio.reap(q, None, True)
    m.close()  # released
    aio.close()
    dev.close()


def test_engines_and_errors(ddir: Path) -> None:
    disk = ddir / "d.img"
    disk.write_bytes(bytes(DISK))
    fd = os.open(disk, os.O_RDWR)
    try:
        auto = BlkAio(fd, SECTORS, 126, False, 64)
        assert (auto.engine, auto.reason) == (("io_uring", "io_uring") if NO_URING is None
                                              else ("threads", NO_URING))  # fmt: skip
        t = BlkAio(fd, SECTORS, 126, False, 64, engine="threads")
        assert (t.engine, t.reason) == ("threads", "thread pool asked for")
        for kw in ({"engine": "spdk"}, {"align": 500}, {"mem_align": 8192}, {"depth": 0}):
            args = {"fd": fd, "capacity": SECTORS, "seg_max": 126, "readonly": False,
                    "depth": 64, **kw}  # fmt: skip
            with pytest.raises(ValueError):
                BlkAio(**args)
    finally:
        os.close(fd)
    with pytest.raises(ConfigError, match="cache=fast"):
        BlockDevice(str(disk), cache="fast")
    with pytest.raises(ConfigError, match="aio=native"):
        BlockDevice(str(disk), aio="native")
    dev = parse_device(f"blk:path={disk},cache=none,aio=threads")
    assert isinstance(dev, BlockDevice) and (dev.direct, dev.aio) == (True, "threads")
    assert dev.fast_path_args() is None and dev.sync_args() is not None
    dev.close()
    dev = parse_device(f"blk:path={disk}")  # writeback: the synchronous C path
    assert isinstance(dev, BlockDevice) and (dev.direct, dev.aio) == (False, "sync")
    assert dev.fast_path_args() is not None and dev.open_aio(64, BlkAio) is None
    dev.close()
    with pytest.raises(ConfigError, match="unknown blk option"):
        parse_device(f"blk:path={disk},cache_mode=none")


def test_cache_none_without_o_direct_is_a_clear_error(
    ddir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system without O_DIRECT (tmpfs before Linux 6.6) refuses the open: say so."""
    disk = ddir / "d.img"
    disk.write_bytes(bytes(4096))
    real_open = os.open

    def no_direct(path: Any, flags: int, *a: Any) -> int:
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", no_direct)
    with pytest.raises(BackendError, match="does not support O_DIRECT"):
        BlockDevice(str(disk), cache="none")


@pytest.mark.parametrize("engine", [*ENGINES, *THREADED])
def test_hostile_chains_are_safe(ddir: Path, engine: str) -> None:
    """Corrupted descriptors (overlaps with the rings and other requests, bad lengths and
    flags): the engine never crashes or hangs, every submitted request is reaped, and a walk
    error breaks the queue as on the other paths."""
    outcomes = set()
    for seed in range(60):
        rng = random.Random(seed)
        mem, drv, q, dev, aio = setup(ddir, engine.removesuffix("+thread"))
        vr = Vring(0, num=QSIZE, queue=q, aio=aio, blk=dev, threaded=engine.endswith("+thread"))
        vr.kick, vr.call = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
        try:
            for _ in range(3):
                drv.reset_data()
                drv.get_used()
                add_round(rng, drv, False)
                targets = [drv.desc, drv.avail, drv.used, drv.data_start]
                for _ in range(rng.choice([1, 2])):
                    i = rng.randrange(QSIZE)
                    if rng.random() < 0.6:
                        drv.corrupt_desc(i, addr=rng.choice(targets))
                    elif rng.random() < 0.5:
                        drv.corrupt_desc(i, length=rng.choice([0, 1, 15, 0xFFFFFFFF]))
                    else:
                        drv.corrupt_desc(i, flags=rng.randrange(8), next=rng.randrange(QSIZE + 2))
                try:
                    if vr.threaded:
                        serve_hostile_threaded(vr, dev, mem, drv)
                    else:
                        vr.serve(dev, mem)
                    outcomes.add("ok")
                except BackendError as e:
                    outcomes.add(type(e).__name__)
                if not vr.threaded:
                    vr.reap(mem, wait=True)
                assert aio.in_flight == 0 and not aio.running
                if q.broken:
                    break
        finally:
            vr.stop(mem)
            dev.close()
            vr.close_fds()
    assert {"ok", "RingError"} <= outcomes, outcomes


def serve_hostile_threaded(vr: Vring, dev: BlockDevice, mem: GuestMemory,
                           drv: DriverQueue) -> None:  # fmt: skip
    """As serve_threaded, but a ring error or an unanswerable chain may stop the thread, and
    a corrupted chain may never complete: wait a bounded time, then take the ring back."""
    vr.serve(dev, mem)
    deadline = time.monotonic() + 0.5
    while drv.used_idx != drv.avail_idx and not vr.aio.broken and time.monotonic() < deadline:
        if select.select([vr.aio.wakeup_fd], [], [], 0.01)[0]:
            vr.wakeup(dev, mem)
    try:
        vr.pause(mem)
    finally:
        vr.wakeup(dev, mem)  # as the loop would call it once more: the fd must go quiet
        assert not select.select([vr.aio.wakeup_fd], [], [], 0)[0]
