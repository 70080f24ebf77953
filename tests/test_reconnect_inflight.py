"""Inflight I/O tracking, reconnect after SIGKILL, SIGTERM drain, memory slots: the
synthetic front-end plays QEMU, the back-end is the real `edgevirt backend run` process."""

import os
import signal
import threading
import time

import pytest

from edgevirt.backend.devices import BlockDevice
from edgevirt.backend.devices import blk as b
from edgevirt.backend.loop import Loop
from edgevirt.backend.transport.vhost_user import inflight as infl
from edgevirt.backend.transport.vhost_user import protocol as p
from edgevirt.backend.transport.vhost_user.backend import VhostUserBackend
from edgevirt.backend.transport.vhost_user.frontend import VhostUserFrontend
from edgevirt.backend.transport.vhost_user.protocol import Request as R
from edgevirt.backend.virtq.driver import DriverQueue
from edgevirt.up import BackendProcess, backend_socket
from tests.helpers import no_uring

QSIZE = 64
DISK = 4 << 20


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(DISK))
    return path


#: the synchronous C path on the page cache, and O_DIRECT with io_uring (requests stay in
#: the kernel between loop callbacks: a SIGKILL catches many in flight)
PATHS = {"sync": "", "odirect-io_uring": ",cache=none,aio=io_uring"}
NEEDS_URING = pytest.mark.skipif(no_uring() is not None, reason=f"no io_uring: {no_uring()}")
IO_PARAMS = ["sync", pytest.param("odirect-io_uring", marks=NEEDS_URING)]


def start_backend(tmp_path, disk, name="be", opts=""):
    sock_dir = tmp_path / "sockets"
    proc = BackendProcess(
        [f"blk:path={disk}{opts}"], sock_dir, tmp_path / f"{name}.json", tmp_path / f"{name}.log"
    )
    proc.wait_ready()
    return proc, str(backend_socket(sock_dir, 0, "blk"))


def attach(fe, inflight, driver=None):
    """What QEMU does at vhost_user_blk_start: features, memory, inflight fd, rings."""
    fe.negotiate(1 << p.F_EVENT_IDX)
    fe.set_mem_table()
    fe.set_inflight(inflight[0], inflight[1], 1, QSIZE)
    base = driver.used_idx if driver is not None else 0  # QEMU: last_avail = used->idx
    return fe.setup_vring(0, QSIZE, driver=driver, vring_base=base, event_idx=True)


def writes(drv, first, count, size=4096):
    """Queue ``count`` writes of a per-request pattern; returns {head: (sector, data)}."""
    out = {}
    for i in range(first, first + count):
        data = bytes([i % 251]) * size
        sector = i % (DISK // 65536) * 128  # 64 KiB slots: a later write replaces it whole
        head = drv.add([b.REQ_HEADER.pack(b.T_OUT, 0, sector), data], [1], publish=False)
        out[head] = (sector, data)
    drv.publish()
    return out


@pytest.fixture
def served(tmp_path, disk):
    """A blk back-end on its own loop thread and a synthetic front-end connected to it."""
    loop = Loop()
    be = VhostUserBackend(BlockDevice(str(disk)), str(tmp_path / "blk.sock"), loop)
    t = threading.Thread(target=loop.run, daemon=True)
    t.start()
    fe = VhostUserFrontend(be.path)
    yield be, fe
    fe.close()
    loop.stop()
    t.join(5)
    be.close()


def test_inflight_chains_of_a_dead_backend_are_resubmitted(served, disk):
    """Deterministic: the region says heads were taken and not completed; a new back-end
    completes them, then serves the chain nobody had taken yet."""
    be, fe = served
    fd, size = fe.get_inflight(1, QSIZE)
    assert size == infl.queue_region_size(1024) == 16448
    # A "previous back-end" took chains A and B (counters 7, 5: B is older), not C.
    region = infl.InflightRegion(fd, size, 0, 1, QSIZE)
    drv_q = DriverQueue(fe.mem, QSIZE, event_idx=True)
    pending = writes(drv_q, 1, 3)
    heads = list(pending)
    iq = region.queue(0)
    assert iq is not None and iq.queue_size >= 1024
    iq.queue_size = QSIZE  # what a back-end serving this 64-entry ring records
    iq.init(0)
    iq.counter = 7
    iq.taken(heads[0])
    iq.counter = 5
    iq.taken(heads[1])
    iq.buf.release()
    region.close()
    attach(fe, (fd, size), driver=drv_q)
    fe.kick(0)
    assert fe.wait_call(0)
    deadline = time.monotonic() + 5
    used = []
    while len(used) < 3 and time.monotonic() < deadline:
        used += drv_q.get_used()
        time.sleep(0.01)
    # Oldest counter first: B, then A, then C from the avail ring.
    assert [h for h, _ in used] == [heads[1], heads[0], heads[2]]
    image = disk.read_bytes()
    for sector, data in pending.values():
        assert image[sector * 512 : sector * 512 + len(data)] == data
    q = be.snapshot()["queues"][0]
    assert q["resubmitted"] == 2 and q["served"] == 3 and q["inflight_tracking"]
    os.close(fd)


def in_flight(fd, size):
    region = infl.InflightRegion(fd, size, 0, 1, QSIZE)
    iq = region.queue(0)
    assert iq is not None
    iq.queue_size = QSIZE
    n = iq.in_flight()
    iq.buf.release()
    region.close()
    return n


@pytest.mark.parametrize("io", IO_PARAMS)
def test_sigkill_mid_traffic_then_restart_loses_no_write(tmp_path, disk, io):
    """SIGKILL the back-end process while it is in the middle of a batch of writes (caught
    by stopping it and looking at the inflight region), restart it, reconnect like QEMU
    (same rings, used->idx as base, same inflight fd): every write completes and the disk
    holds every pattern."""
    proc, path = start_backend(tmp_path, disk, "first", PATHS[io])
    fe = VhostUserFrontend(path, size=16 << 20)
    fd = -1
    try:
        fd, size = fe.get_inflight(1, QSIZE)
        drv = attach(fe, (fd, size)).driver
        expected: dict[int, bytes] = {}
        caught = 0
        for attempt in range(300):
            drv.reset_data()
            batch = writes(drv, attempt * 20, 20, size=64 * 1024 - 4096)
            expected.update(dict(batch.values()))
            fe.kick(0)
            time.sleep(attempt % 10 * 50e-6)
            os.kill(proc.proc.pid, signal.SIGSTOP)
            caught = in_flight(fd, size)
            if caught:
                os.kill(proc.proc.pid, signal.SIGKILL)
                break
            os.kill(proc.proc.pid, signal.SIGCONT)
            deadline = time.monotonic() + 5
            while drv._chains and time.monotonic() < deadline:
                fe.wait_call(0, 0.1)
                drv.get_used()
            assert not drv._chains
        assert caught, "never caught the back-end mid-batch"
        proc.proc.wait(5)
        proc.stop()
        drv.get_used()
        left = len(drv._chains)
        fe.close_socket()
        proc2, path2 = start_backend(tmp_path, disk, "second", PATHS[io])
        try:
            fe.reconnect(path2)
            attach(fe, (fd, size), driver=drv)
            deadline = time.monotonic() + 10
            while drv._chains and time.monotonic() < deadline:
                fe.wait_call(0, 0.1)
                drv.get_used()
            assert not drv._chains, f"{len(drv._chains)} of {left} chains never completed"
            image = disk.read_bytes()
            for sector, data in expected.items():
                assert image[sector * 512 : sector * 512 + len(data)] == data, sector
            assert in_flight(fd, size) == 0
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                q = proc2.stats()["devices"][0]["queues"][0]
                if q["resubmitted"]:
                    break
                time.sleep(0.05)
            assert q["resubmitted"] == caught and q["served"] == left
            assert proc2.stats()["devices"][0]["broken"] == []
            assert q["io"] == ("io_uring" if PATHS[io] else None)
        finally:
            fe.close()
            proc2.stop()
    finally:
        if fd >= 0:
            os.close(fd)
        proc.stop()


@pytest.mark.parametrize("io", IO_PARAMS)
def test_sigterm_drains_and_leaves_nothing_in_flight(tmp_path, disk, io):
    proc, path = start_backend(tmp_path, disk, opts=PATHS[io])
    fe = VhostUserFrontend(path, size=16 << 20)
    fd = -1
    try:
        fd, size = fe.get_inflight(1, QSIZE)
        drv = attach(fe, (fd, size)).driver
        log = tmp_path / "be.log"
        deadline = time.monotonic() + 10  # the ring must be running before the signal
        while "vring 0 started" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.01)
        writes(drv, 0, QSIZE // 3, size=64 * 1024)
        fe.kick(0)
        time.sleep(0.005)
        os.killpg(proc.proc.pid, signal.SIGTERM)
        assert proc.proc.wait(10) == 0
        region = infl.InflightRegion(fd, size, 0, 1, QSIZE)
        iq = region.queue(0)
        assert iq is not None
        _f, version, _n, _l, used_idx = infl.QUEUE_HEADER.unpack_from(iq.buf, 0)
        # Every chain the back-end took was completed: the used ring agrees with the region.
        assert iq.in_flight() == 0 and used_idx == drv.used_idx and version == 1
        iq.buf.release()
        region.close()
        log = (tmp_path / "be.log").read_text()
        assert "stopping" in log
    finally:
        if fd >= 0:
            os.close(fd)
        fe.close()
        proc.stop()


def test_configure_mem_slots_add_remove_region(served, disk):
    be, fe = served
    fe.negotiate()
    assert be.offered_protocol_features >> p.ProtocolFeature.CONFIGURE_MEM_SLOTS & 1
    assert p.U64.unpack(fe.call(R.GET_MAX_MEM_SLOTS))[0] == p.MAX_MEM_SLOTS
    assert fe.add_mem_reg() == 0
    assert be.snapshot()["mapped_bytes"] == fe.region.size
    assert fe.add_mem_reg() == 1  # overlapping region refused, with a NACK
    fe.setup_vring(0)
    drv = fe.vrings[0].driver
    drv.add([b.REQ_HEADER.pack(b.T_OUT, 0, 0), b"a" * 512], [1])
    fe.kick(0)
    assert fe.wait_call(0)
    assert fe.rem_mem_reg() == 0
    assert be.mem.mapped_bytes == 0 and not be.vrings[0].queue
    assert fe.rem_mem_reg() == 1  # nothing mapped there any more
    assert fe.add_mem_reg() == 0  # the ring restarts where it stopped
    drv.add([b.REQ_HEADER.pack(b.T_OUT, 0, 1), b"b" * 512], [1])
    fe.kick(0)
    assert fe.wait_call(0)
    assert [n for _, n in drv.get_used()] == [1, 1]
    assert disk.read_bytes()[:1024] == b"a" * 512 + b"b" * 512


def test_region_added_while_the_engine_thread_serves(tmp_path, disk):
    """ADD_MEM_REG while a cache=none queue runs on its engine thread: the thread is paused
    and restarted with the new table, so a request whose data lies in the new region is
    served (not refused as outside guest memory)."""
    from edgevirt.backend.memory import memfd_region
    from edgevirt.backend.transport.vhost_user.frontend import FAKE_UVA
    from edgevirt.backend.virtq.pyring import DESC_F_NEXT, DESC_F_WRITE

    loop = Loop()
    be = VhostUserBackend(BlockDevice(str(disk), cache="none"), str(tmp_path / "b.sock"), loop)
    t = threading.Thread(target=loop.run, daemon=True)
    t.start()
    fe = VhostUserFrontend(be.path)
    fd2, region2 = memfd_region(0x6000_0000, 1 << 20, "second")
    try:
        fe.negotiate()
        assert fe.add_mem_reg() == 0
        fe.setup_vring(0)
        drv = fe.vrings[0].driver
        drv.add([b.REQ_HEADER.pack(b.T_OUT, 0, 0), b"a" * 512], [1])
        fe.kick(0)
        assert fe.wait_call(0)
        assert be.snapshot()["queues"][0]["io_thread"]
        uva2 = FAKE_UVA + (1 << 32)
        body = p.MEM_REG.pack(0) + p.MEM_REGION.pack(region2.gpa, region2.size, uva2, 0)
        assert fe.ack(R.ADD_MEM_REG, body, [fd2]) == 0
        region2.buf[:512] = b"z" * 512  # the data of the next write, in the new region
        drv.get_used()
        hdr, status = drv.alloc(16, b.REQ_HEADER.pack(b.T_OUT, 0, 1)), drv.alloc(1)
        head = drv._free.pop(0)
        ids = [head, drv._free.pop(0), drv._free.pop(0)]
        drv.write_desc(ids[0], hdr, 16, DESC_F_NEXT, ids[1])
        drv.write_desc(ids[1], region2.gpa, 512, DESC_F_NEXT, ids[2])
        drv.write_desc(ids[2], status, 1, DESC_F_WRITE, 0)
        drv._chains[head] = ids
        drv.make_available(head)
        fe.kick(0)
        assert fe.wait_call(0)
        assert drv.get_used() == [(head, 1)] and drv.read(status, 1) == b"\0"
        assert disk.read_bytes()[:1024] == b"a" * 512 + b"z" * 512
        snap = be.snapshot()
        assert snap["broken"] == [] and snap["queues"][0]["io_thread"]
        q = snap["queues"][0]  # the thread's kicks, calls and chains reach the stats
        assert q["kicks"] >= 2 and q["notifications"] >= 2 and q["served"] == 2
        # the first write's buffer is 16-byte aligned (bounced), the second 4 KiB aligned
        assert snap["requests"] == 2 and snap["by_type"] == {"write": 2, "bounced": 1}
    finally:
        fe.close()
        loop.stop()
        t.join(5)
        be.close()
        region2.buf.close()
        os.close(fd2)


def test_get_status_reports_needs_reset_after_a_broken_vring(served, disk):
    be, fe = served
    fe.negotiate()
    fe.set_mem_table()
    fe.send(R.SET_STATUS, p.U64.pack(0x0F))
    assert p.U64.unpack(fe.call(R.GET_STATUS))[0] == 0x0F
    fe.setup_vring(0)
    drv = fe.vrings[0].driver
    drv.write_avail_entry(0, QSIZE + 5)  # head out of range
    drv.set_avail_idx(1)
    fe.kick(0)
    deadline = time.monotonic() + 5
    while not be.snapshot()["broken"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert p.U64.unpack(fe.call(R.GET_STATUS))[0] == 0x0F | 0x40
