"""The vhost-user back-end against the synthetic front-end: real sockets, fds and rings."""

import os
import socket
import struct
import threading
import time

import pytest

from edgevirt.backend.devices import BlockDevice, RngDevice
from edgevirt.backend.loop import Loop
from edgevirt.backend.transport.vhost_user import backend as backend_mod
from edgevirt.backend.transport.vhost_user import protocol as p
from edgevirt.backend.transport.vhost_user.backend import VhostUserBackend
from edgevirt.backend.transport.vhost_user.frontend import VhostUserFrontend
from edgevirt.backend.transport.vhost_user.protocol import Request as R
from tests.helpers import wait_until

BLK_HDR = struct.Struct("<IIQ")


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    return path


@pytest.fixture
def served(tmp_path, disk):
    """blk and rng back-ends on one loop in a thread; yields their socket paths."""
    loop = Loop()
    backends = {
        "blk": VhostUserBackend(BlockDevice(str(disk)), str(tmp_path / "blk.sock"), loop),
        "rng": VhostUserBackend(RngDevice(), str(tmp_path / "rng.sock"), loop),
    }
    t = threading.Thread(target=loop.run, daemon=True)
    t.start()
    yield backends
    loop.stop()
    t.join(5)
    for b in backends.values():
        b.close()


def connect(backend, **kw):
    fe = VhostUserFrontend(backend.path, **kw)
    fe.negotiate()
    fe.set_mem_table()
    return fe


def blk_request(fe, rtype, sector, data=b"", read_len=0):
    drv = fe.vrings[0].driver
    readable = [BLK_HDR.pack(rtype, 0, sector)] + ([data] if data else [])
    writable = ([read_len] if read_len else []) + [1]
    head = drv.add(readable, writable)
    fe.kick(0)
    assert fe.wait_call(0), "no used notification"
    [(h, written)] = drv.get_used()
    assert h == head
    return drv, head, written


def test_features_offer_version1_and_access_platform(served):
    fe = VhostUserFrontend(served["blk"].path)
    offered = int(p.U64.unpack(fe.call(R.GET_FEATURES))[0])
    proto = int(p.U64.unpack(fe.call(R.GET_PROTOCOL_FEATURES))[0])
    assert offered >> 32 & 1 and offered >> 33 & 1 and offered >> 30 & 1
    # QEMU refuses ACCESS_PLATFORM without REPLY_ACK and BACKEND_REQ; blk needs CONFIG.
    for bit in (
        p.ProtocolFeature.REPLY_ACK,
        p.ProtocolFeature.BACKEND_REQ,
        p.ProtocolFeature.CONFIG,
        p.ProtocolFeature.MQ,
    ):
        assert proto >> bit & 1
    fe.close()


def test_blk_config_capacity(served):
    fe = connect(served["blk"])
    cfg = fe.get_config(60)
    assert struct.unpack_from("<Q", cfg)[0] == (1 << 20) // 512
    assert struct.unpack_from("<I", cfg, 20)[0] == 512  # blk_size
    fe.close()


def test_blk_write_then_read_through_rings(served, disk):
    fe = connect(served["blk"])
    fe.setup_vring(0)
    payload = os.urandom(4096)
    drv, head, written = blk_request(fe, 1, 8, data=payload)
    assert written == 1
    assert disk.read_bytes()[8 * 512 : 8 * 512 + 4096] == payload
    drv, head, written = blk_request(fe, 0, 8, read_len=4096)
    assert written == 4097
    # The read data sits in the writable buffer right after the request header.
    d = drv.read_desc(drv.read_desc(head)[3])
    assert drv.read(d[0], 4096) == payload
    stats = served["blk"].snapshot()
    assert stats["requests"] == 2 and stats["bytes_read"] == 4096 and stats["bytes_written"] == 4096
    assert stats["mapped_bytes"] == 4 << 20 and stats["refused"] == 0
    fe.close()


def test_blk_read_beyond_capacity_is_ioerr_not_crash(served):
    fe = connect(served["blk"])
    fe.setup_vring(0)
    drv, head, written = blk_request(fe, 0, (1 << 20) // 512, read_len=512)
    status_desc = drv.read_desc(drv.read_desc(drv.read_desc(head)[3])[3])
    assert drv.read(status_desc[0], 1) == b"\x01"  # VIRTIO_BLK_S_IOERR
    fe.close()


def test_blk_unknown_request_type_is_unsupp(served):
    fe = connect(served["blk"])
    fe.setup_vring(0)
    drv, head, _ = blk_request(fe, 99, 0)
    status_desc = drv.read_desc(drv.read_desc(head)[3])
    assert drv.read(status_desc[0], 1) == b"\x02"
    fe.close()


def test_rng_fills_buffers(served):
    fe = connect(served["rng"])
    fe.setup_vring(0)
    drv = fe.vrings[0].driver
    head = drv.add([], [256])
    fe.kick(0)
    assert fe.wait_call(0)
    [(h, n)] = drv.get_used()
    assert (h, n) == (head, 256)
    data = drv.read(drv.read_desc(head)[0], 256)
    assert len(set(data)) > 16
    fe.close()


def test_rule_ring_outside_carveout_names_address_and_bounds(served):
    fe = connect(served["blk"])
    bad = fe.region.uva + fe.region.size + 0x1000  # just past the carve-out mapping
    fe.setup_vring(0, addr_override=(bad, fe.uva(0x5C000000 + 0x10000), fe.uva(0x5C000000)))
    assert wait_until(lambda: served["blk"].snapshot()["broken"])
    msg = served["blk"].snapshot()["broken"][0]
    assert f"uva {bad:#x}" in msg and "0x5c000000" in msg and "0x5c400000" in msg
    assert served["blk"].snapshot()["refused"] == 1
    # The same process still serves the other device.
    fe2 = connect(served["rng"])
    fe2.setup_vring(0)
    fe2.vrings[0].driver.add([], [64])
    fe2.kick(0)
    assert fe2.wait_call(0)
    fe.close()
    fe2.close()


def test_rule_descriptor_outside_carveout_breaks_queue_only(served):
    fe = connect(served["blk"])
    fe.setup_vring(0)
    drv = fe.vrings[0].driver
    head = drv.add([BLK_HDR.pack(0, 0, 0)], [512, 1])
    # Point the data buffer at guest RAM outside the carve-out (private node 0).
    second = drv.read_desc(head)[3]
    addr, length, flags, nxt = drv.read_desc(second)
    drv.write_desc(second, 0x40000000, length, flags, nxt)
    fe.kick(0)
    assert wait_until(lambda: served["blk"].snapshot()["broken"])
    assert "0x40000000" in served["blk"].snapshot()["broken"][0]
    assert drv.get_used() == []  # nothing completed from a hostile chain
    fe.close()


def test_protocol_error_drops_connection_and_backend_accepts_again(served):
    fe = VhostUserFrontend(served["blk"].path)
    fe.send(R.SET_VRING_NUM, b"\0" * 3)  # wrong payload size
    assert fe.sock.recv(1) == b""  # back-end hung up on us
    fe.close()
    assert wait_until(lambda: not served["blk"].snapshot()["connected"])
    assert served["blk"].snapshot()["protocol_errors"] == 1
    fe = connect(served["blk"])
    fe.setup_vring(0)
    blk_request(fe, 1, 0, data=bytes(512))
    fe.close()


def test_truncated_payload_times_out(served, monkeypatch):
    monkeypatch.setattr(backend_mod, "PAYLOAD_TIMEOUT", 0.3)
    fe = VhostUserFrontend(served["blk"].path)
    fe.sock.sendall(p.HEADER.pack(R.SET_VRING_ADDR, 1, 40) + b"\0" * 8)
    assert fe.sock.recv(1) == b""
    fe.close()


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_fds_closed_on_every_error_path(served):
    fe = connect(served["blk"])
    before = open_fds()
    for _ in range(20):
        r, w = os.pipe()
        # SET_VRING_KICK for a vring the device does not have: refused, fd must be closed.
        assert fe.ack(R.SET_VRING_KICK, p.U64.pack(7), [r]) != 0
        os.close(r)
        os.close(w)
    assert wait_until(lambda: open_fds() <= before + 1)
    fe.close()


def test_unoffered_feature_refused_with_nack(served):
    fe = connect(served["blk"])
    assert fe.ack(R.SET_FEATURES, p.U64.pack(1 << 63)) == 1
    assert fe.ack(R.SET_OWNER) == 0
    fe.close()


def test_get_vring_base_returns_last_avail(served):
    fe = connect(served["blk"])
    fe.setup_vring(0)
    for i in range(3):
        blk_request(fe, 1, i, data=bytes(512))
    assert fe.get_vring_base(0) == 3
    fe.close()


def test_second_front_end_is_refused_while_first_connected(served):
    fe = connect(served["blk"])
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(2)
    s.connect(served["blk"].path)
    assert s.recv(1) == b""
    s.close()
    fe.close()


def test_new_kick_fd_on_a_running_ring_is_listened_to(served, disk):
    """SET_VRING_KICK on a started ring replaced the fd but never watched the new one: the
    ring went deaf until restarted (found while fixing a loop defect the sequence fuzzer
    found)."""
    fe = connect(served["blk"])
    fe.setup_vring(0)
    blk_request(fe, 1, 0, data=b"a" * 512)  # the ring runs
    new_kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    fe.send(p.Request.SET_VRING_KICK, p.U64.pack(0), [new_kick])
    fe.call(p.Request.GET_FEATURES)  # a round trip: SET_VRING_KICK was processed
    os.close(fe.vrings[0].kick)
    fe.vrings[0].kick = new_kick
    drv, _, written = blk_request(fe, 1, 8, data=b"b" * 512)  # kicked on the new fd only
    assert written == 1 and disk.read_bytes()[8 * 512 : 9 * 512] == b"b" * 512
    fe.close()


@pytest.mark.parametrize("kind", ["memfd", "pipe-write-end", "dev-null"])
def test_kick_or_call_fd_that_is_not_an_eventfd_is_refused(served, disk, kind):
    """Regression (fuzz/fuzz_vhost_user_seq.py): a memfd as kick fd reached epoll, which
    refuses regular files: PermissionError ended the back-end. A pipe's write end as call fd
    would block it once full. Only eventfds are taken."""
    fe = connect(served["blk"])
    drv = fe.setup_vring(0).driver  # a proper ring first: the bad fd then replaces its fds
    if kind == "memfd":
        bad, keep = os.memfd_create("not-an-eventfd"), -1
    elif kind == "pipe-write-end":
        keep, bad = os.pipe()
    else:
        bad, keep = os.open("/dev/null", os.O_RDWR), -1
    for req in (p.Request.SET_VRING_KICK, p.Request.SET_VRING_CALL):
        assert fe.ack(req, p.U64.pack(0), [bad]) == 1  # refused, connection kept
    os.close(bad)
    if keep >= 0:
        os.close(keep)
    # the ring still runs on its eventfds, and the back-end serves
    drv2, _, written = blk_request(fe, 1, 16, data=b"c" * 512)
    assert written == 1 and disk.read_bytes()[16 * 512 : 17 * 512] == b"c" * 512
    del drv, drv2
    fe.close()


@pytest.mark.parametrize(
    "size, offset",
    [(1 << 63, 0), ((4 << 20) + 4096, 0), (4 << 20, 4096), ((1 << 64) - 4096, 4096)],
    ids=["2^63", "past-the-file", "offset-past-the-file", "wraps"],
)
def test_mem_table_region_larger_than_its_file_is_refused(served, disk, size, offset):
    """Regression (fuzz/fuzz_vhost_user_seq.py): a region of 2^63 bytes made mmap raise
    OverflowError, which ended the back-end; a region past the end of its file would map and
    then fault (SIGBUS) on first touch."""
    fe = connect(served["blk"])
    body = p.MEM_HEADER.pack(1, 0) + p.MEM_REGION.pack(fe.region.gpa, size, fe.region.uva, offset)
    assert fe.ack(p.Request.SET_MEM_TABLE, body, [fe.fd]) == 1
    fe.set_mem_table()  # the real one is still taken
    fe.setup_vring(0)
    _, _, written = blk_request(fe, 1, 24, data=b"d" * 512)
    assert written == 1 and disk.read_bytes()[24 * 512 : 25 * 512] == b"d" * 512
    fe.close()


def _backend_process(tmp_path, disk):
    """``edgevirt backend run`` in its own process (a SIGBUS shows as a dead back-end rather
    than a dead pytest), a connected front-end and the stats file."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "edgevirt", "backend", "run", "--device", f"blk:path={disk}",
         "--socket-dir", str(tmp_path), "--stats", str(tmp_path / "stats.json")],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "backend.log", "wb"),  # noqa: SIM115
    )  # fmt: skip
    sock = tmp_path / "0-blk.sock"
    assert wait_until(sock.exists, 30), (tmp_path / "backend.log").read_text()
    for _ in range(100):
        try:
            return proc, connect(type("B", (), {"path": str(sock)}))
        except ConnectionRefusedError:  # bound, not listening yet
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("back-end does not listen")


def test_front_end_cannot_shrink_its_memfd_under_the_back_end(tmp_path, disk):
    """Regression (issue 18): a front-end that ftruncated its memfd to 0 after SET_MEM_TABLE
    ended the back-end with SIGBUS on its next touch of the ring. The back-end now seals the
    file (F_SEAL_SHRINK): the truncation fails and the back-end serves on."""
    proc, fe = _backend_process(tmp_path, disk)
    try:
        fe.setup_vring(0)
        fe.call(R.GET_FEATURES)  # a round trip: the mem table was handled
        with pytest.raises(PermissionError):
            os.ftruncate(fe.fd, 0)
        _, _, written = blk_request(fe, 1, 8, data=b"s" * 512)  # the back-end touches the ring
        assert written == 1 and disk.read_bytes()[8 * 512 : 9 * 512] == b"s" * 512
        assert proc.poll() is None
        fe.close()
    finally:
        proc.kill()
        proc.wait()


def test_unsealable_memory_file_shrunk_under_the_back_end_reads_as_zeros(tmp_path, disk):
    """Regression (issue 18): a memory file that cannot be sealed (QEMU's memfd with
    seal=off here) shrunk to 0 while the ring runs: the back-end's SIGBUS safety net puts
    zero pages where the file's pages vanished, counts them, and the process lives on."""
    import json

    proc, fe = _backend_process(tmp_path, disk)
    fd = os.memfd_create("seal-off", os.MFD_CLOEXEC)  # F_SEAL_SEAL from birth
    try:
        os.ftruncate(fd, fe.region.size)
        body = p.MEM_HEADER.pack(1, 0) + p.MEM_REGION.pack(
            fe.region.gpa, fe.region.size, fe.region.uva, 0
        )
        fe.send(R.SET_MEM_TABLE, body, [fd])
        fe.setup_vring(0)  # our own writes go to fe.fd's pages: the back-end reads fd's
        fe.call(R.GET_FEATURES)
        os.ftruncate(fd, 0)  # unsealed: allowed
        fe.kick(0)  # the back-end reads the ring's avail index: a vanished page
        stats = tmp_path / "stats.json"
        assert wait_until(
            lambda: stats.exists() and '"vanished_pages": 0' not in stats.read_text(), 10
        ), stats.read_text() if stats.exists() else "no stats"
        assert proc.poll() is None, (tmp_path / "backend.log").read_text()[-2000:]
        snap = json.loads(stats.read_text())
        blk = next(d for d in snap["devices"] if d["device"] == "blk")
        assert blk["unsealed_regions"] == 1 and blk["vanished_pages"] >= 1, blk
        assert "cannot be sealed against shrinking" in (tmp_path / "backend.log").read_text()
        fe.close()
    finally:
        os.close(fd)
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("kind", ["memfd-seal-off", "dev-shm-file"])
def test_unsealable_memory_file_is_served_and_counted(served, kind):
    """Policy (issue 18): a memory file that cannot be sealed — QEMU's memfd with seal=off,
    memory-backend-file on /dev/shm or hugetlbfs — is served (those set-ups must keep
    working), named in a warning and counted in ``unsealed_regions``."""
    from edgevirt.backend.memory import seal_against_shrinking

    fe = connect(served["rng"])
    if kind == "memfd-seal-off":
        fd = os.memfd_create("seal-off", os.MFD_CLOEXEC)  # F_SEAL_SEAL from birth
    else:
        fd = os.open("/dev/shm", os.O_RDWR | os.O_TMPFILE, 0o600)
    try:
        os.ftruncate(fd, fe.region.size)
        assert seal_against_shrinking(fd) is not None
        body = p.MEM_HEADER.pack(1, 0) + p.MEM_REGION.pack(
            fe.region.gpa, fe.region.size, fe.region.uva, 0
        )
        assert fe.ack(R.SET_MEM_TABLE, body, [fd]) == 0
        assert served["rng"].snapshot()["unsealed_regions"] == 1
        fe.set_mem_table()  # the front-end's own memfd: sealable, sealed
        fe.call(R.GET_FEATURES)
        assert served["rng"].snapshot()["unsealed_regions"] == 1
        assert seal_against_shrinking(fe.fd) is None
    finally:
        os.close(fd)
        fe.close()
