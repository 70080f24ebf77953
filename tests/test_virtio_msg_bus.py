"""The virtio-msg bus through real shared memory, real eventfds and the real ivshmem server
protocol: a Python driver peer (what QEMU + the guest module do) against the back-end bus
serving the unchanged blk and rng devices. Hostile messages and indices included."""

from __future__ import annotations

import array
import hashlib
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgevirt.backend.devices import BlockDevice, RngDevice
from edgevirt.backend.loop import Loop
from edgevirt.backend.memory import GuestMemory
from edgevirt.backend.transport.virtio_msg import protocol as p
from edgevirt.backend.transport.virtio_msg.bus import MsgBus
from edgevirt.backend.transport.virtio_msg.channel import SLOT_SIZE, MessageMemory
from edgevirt.backend.transport.virtio_msg.driver import MsgDriver
from edgevirt.backend.transport.virtio_msg.protocol import BusMsgId, MsgId, VirtioMsgError
from edgevirt.backend.transport.virtio_msg.service import map_carveout
from edgevirt.backend.virtq.driver import DriverQueue
from tests.helpers import no_uring, odirect_dir

BASE = 0x5C00_0000
CARVEOUT = 2 << 20
SECTOR = 512
T_IN, T_OUT = 0, 1


@dataclass
class Env:
    tmp: Path
    bus: MsgBus
    sock: str
    carve: GuestMemory  # the driver's own mapping of the carve-out file
    disk: Path

    def driver(self, **kw: object) -> MsgDriver:
        return MsgDriver(self.sock, self.carve, **kw)  # type: ignore[arg-type]

    def wait(self, cond: object, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():  # type: ignore[operator]
            assert time.monotonic() < deadline, "condition not met in time"
            time.sleep(0.01)


def start_bus(tmp: Path, **kw: object) -> tuple[Env, Loop, threading.Thread, GuestMemory]:
    carve_file = tmp / "carveout"
    with open(carve_file, "wb") as f:
        f.truncate(CARVEOUT)
    disk = tmp / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    mem = map_carveout(carve_file, BASE)
    loop = Loop()
    sock = str(tmp / "ivshmem.sock")
    bus = MsgBus([BlockDevice(str(disk)), RngDevice()], mem, loop, socket_path=sock, **kw)  # type: ignore[arg-type]
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    return Env(tmp, bus, sock, map_carveout(carve_file, BASE), disk), loop, thread, mem


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e, loop, thread, mem = start_bus(tmp_path)
    yield e
    loop.stop()
    thread.join(5)
    e.bus.close()
    mem.close()
    e.carve.close()
    loop.close()


F_EVENT_IDX = 29


def blk_ready(drv: MsgDriver, carve: GuestMemory, base: int = BASE) -> DriverQueue:
    # Without EVENT_IDX: the mock driver does not maintain used_event.
    assert drv.negotiate(0, drv.features(0) & ~(1 << F_EVENT_IDX)) & p.STATUS_FEATURES_OK
    q = DriverQueue(carve, 16, base=base)
    drv.setup_queue(0, 0, q)
    assert drv.driver_ok(0) & p.STATUS_DRIVER_OK
    return q


def blk_io(
    drv: MsgDriver, q: DriverQueue, rtype: int, sector: int, data: bytes = b"", n: int = 0
) -> tuple[int, bytes]:
    hdr = struct.pack("<IIQ", rtype, 0, sector)
    q.reset_data()
    readable = [hdr, data] if data else [hdr]
    head = q.add(readable, [n, 1] if n else [1])
    drv.kick(0, 0)
    drv.wait_used(0, 0)
    [(got, _written)] = q.get_used()
    assert got == head
    chain, idx = [], head
    while True:
        addr, length, flags, nxt = q.read_desc(idx)
        chain.append((addr, length, flags))
        if not flags & 1:  # VRING_DESC_F_NEXT
            break
        idx = nxt
    status = q.read(chain[-1][0], 1)[0]
    payload = q.read(chain[-2][0], n) if n else b""
    return status, payload


# -- the ivshmem server protocol ------------------------------------------------------------


def test_ivshmem_server_sends_the_documented_sequence(env: Env) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(env.sock)
    s.settimeout(5)
    seen = []
    for _ in range(7):
        data, anc, _, _ = s.recvmsg(8, socket.CMSG_SPACE(4 * 4))
        fds = array.array("i")
        for _lvl, _typ, cdata in anc:
            fds.frombytes(cdata)
        seen.append((struct.unpack("<q", data)[0], len(fds)))
        if len(fds) and seen[-1][0] == -1:
            assert os.fstat(fds[0]).st_size == 64 << 10  # the message memory
        for fd in fds:
            os.close(fd)
    s.close()
    # version 0; our id; -1 + shm; back-end (peer 0) x 2 vectors; our id x 2 vectors
    assert seen == [(0, 0), (1, 0), (-1, 1), (0, 1), (0, 1), (1, 1), (1, 1)]


def test_second_client_is_refused_and_a_reconnect_gets_a_new_id(env: Env) -> None:
    with env.driver() as drv:
        assert drv.peer.id == 1
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(env.sock)
        s.settimeout(5)
        assert s.recv(8) == b""  # closed without a word
        s.close()
    env.wait(lambda: env.bus.server is not None and env.bus.server.client is None)
    with env.driver() as drv:
        assert drv.peer.id == 2
        assert drv.request(MsgId.GET_DEVICE_STATUS, 0)["status"] == 0


def test_message_memory_header_is_what_the_driver_checks(env: Env) -> None:
    with env.driver() as drv:
        g = drv.msgmem.geometry
        assert (g.size, g.nslots, g.device_peer, g.slot_size) == (64 << 10, 64, 0, 264)
        assert drv.peer.eventfds.keys() == {0}
    raw = bytearray(64 << 10)
    MessageMemory.create(memoryview(raw)).close()
    MessageMemory.attach(memoryview(raw)).close()
    raw[0] ^= 1
    with pytest.raises(VirtioMsgError, match="magic"):
        MessageMemory.attach(memoryview(raw))


# -- the transport messages -----------------------------------------------------------------


def test_device_info_features_and_inactive_device(env: Env) -> None:
    with env.driver() as drv:
        blk = drv.request(MsgId.GET_DEVICE_INFO, 0)
        assert (blk["device_id"], blk["config_size"], blk["max_virtqueues"]) == (2, 60, 1)
        assert blk["num_feature_bits"] % 32 == 0
        assert drv.request(MsgId.GET_DEVICE_INFO, 1)["device_id"] == 4
        ghost = drv.request(MsgId.GET_DEVICE_INFO, 9)
        assert all(v == 0 for v in ghost.fields.values())
        f = drv.features(0)
        assert f >> 32 & 1 and f >> 33 & 1, "VERSION_1 and ACCESS_PLATFORM must be offered"
        beyond = drv.request(MsgId.GET_DEVICE_FEATURES, 0, index=2, num_blocks=3)
        assert beyond.data == bytes(12)


def test_blk_write_then_read_through_rings_in_the_carveout(env: Env) -> None:
    data = os.urandom(4096)
    with env.driver() as drv:
        q = blk_ready(drv, env.carve)
        assert blk_io(drv, q, T_OUT, 8, data)[0] == 0
        assert env.disk.read_bytes()[8 * SECTOR : 8 * SECTOR + 4096] == data
        status, back = blk_io(drv, q, T_IN, 8, n=4096)
        assert status == 0 and back == data
    dev = env.bus.snapshot()["devices"][0]
    assert dev["requests"] == 2 and dev["refused"] == 0 and dev["mapped_bytes"] == CARVEOUT


def test_blk_reads_and_writes_take_the_c_request_path(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads, writes and flushes over virtio-msg are served by SplitQueue.serve_blk (the
    path vhost-user uses); only the other types reach BlockDevice.handle."""
    from edgevirt.backend.virtq import IMPLEMENTATIONS

    if "c" not in IMPLEMENTATIONS:
        pytest.skip("C extension not built")
    handled: list[int] = []
    orig = BlockDevice.handle

    def handle(self: BlockDevice, queue: int, chain: Any, mem: GuestMemory) -> int:
        handled.append(chain.head)
        return orig(self, queue, chain, mem)

    monkeypatch.setattr(BlockDevice, "handle", handle)
    data = os.urandom(8192)
    with env.driver() as drv:
        q = blk_ready(drv, env.carve)
        assert blk_io(drv, q, T_OUT, 16, data)[0] == 0
        assert blk_io(drv, q, T_IN, 16, n=8192) == (0, data)
        assert handled == []
        assert blk_io(drv, q, 8, 0, n=20)[0] == 0  # GET_ID: the device's Python path
        assert len(handled) == 1
    dev = env.bus.snapshot()["devices"][0]
    assert dev["requests"] == 3 and dev["by_type"] == {"write": 1, "read": 1, "get_id": 1}


def test_rng_fills_buffers(env: Env) -> None:
    with env.driver() as drv:
        drv.negotiate(1)
        q = DriverQueue(env.carve, 8, base=BASE + (1 << 20))
        drv.setup_queue(1, 0, q)
        drv.driver_ok(1)
        head = q.add([], [256])
        drv.kick(1, 0)
        drv.wait_used(1, 0)
        assert q.get_used() == [(head, 256)]
        gpa = q.read_desc(head)[0]
        assert len(set(q.read(gpa, 256))) > 16


def test_features_ok_refused_for_bits_never_offered(env: Env) -> None:
    with env.driver() as drv:
        status = drv.negotiate(0, features=drv.features(0) | 1 << 40)
        assert not status & p.STATUS_FEATURES_OK
        assert not drv.negotiate(0, features=1 << 33) & p.STATUS_FEATURES_OK  # no VERSION_1
        assert drv.negotiate(0) & p.STATUS_FEATURES_OK


def test_config_reads_with_generation_and_rejects_stale_writes(env: Env) -> None:
    with env.driver() as drv:
        r = drv.request(MsgId.GET_CONFIG, 0, offset=0, size=8)
        assert struct.unpack("<Q", r.data)[0] == (1 << 20) // SECTOR  # capacity in sectors
        gen = r["generation"]
        out = drv.request(MsgId.GET_CONFIG, 0, offset=56, size=8)
        assert out["size"] == 0 and out.data == b""  # beyond the 60-byte space: empty answer
        stale = drv.request(MsgId.SET_CONFIG, 0, b"\0", generation=gen + 1, offset=0, size=1)
        assert stale["size"] == 0 and stale["generation"] == gen
        ok = drv.request(MsgId.SET_CONFIG, 0, b"\0", generation=gen, offset=0, size=1)
        assert ok["size"] == 1  # accepted (blk ignores writes: the data reads back as it is)


def test_get_devices_ping_and_get_shm(env: Env) -> None:
    with env.driver() as drv:
        r = drv.bus_request(BusMsgId.GET_DEVICES, offset=0, count=8)
        assert r.data == b"\x03" and r["next_offset"] == 0
        assert drv.bus_request(BusMsgId.PING, data=0xC0FFEE)["data"] == 0xC0FFEE
        assert drv.request(MsgId.GET_SHM, 0, index=0)["length"] == 0
        vq = drv.request(MsgId.GET_VQUEUE, 0, index=0)
        assert vq["max_size"] == 256
        assert drv.request(MsgId.GET_VQUEUE, 0, index=5)["max_size"] == 0


def test_event_used_is_coalesced_while_unconsumed(env: Env) -> None:
    with env.driver() as drv:
        q = blk_ready(drv, env.carve)
        for _ in range(3):
            q.add([struct.pack("<IIQ", T_IN, 0, 0)], [512, 1])
            drv.kick(0, 0)
            env.wait(lambda: env.bus.devices[0].vqs[0].served >= 1)
            time.sleep(0.05)
        env.wait(lambda: env.bus.devices[0].vqs[0].served == 3)
        events = [m for m in drv.receive() if m.msg_id == MsgId.EVENT_USED]
        assert len(events) == 1  # the first one was never consumed: no more were queued
        assert env.bus.stats.coalesced >= 2
        assert len(q.get_used()) == 3


def test_polling_fallback_without_doorbells(tmp_path: Path) -> None:
    env, loop, thread, mem = start_bus(tmp_path, poll_interval=0.005)
    try:
        with env.driver(doorbell=False) as drv:
            assert drv.request(MsgId.GET_DEVICE_INFO, 0)["device_id"] == 2
        assert env.bus.stats.doorbells_in == 0
    finally:
        loop.stop()
        thread.join(5)
        env.bus.close()
        mem.close()
        env.carve.close()
        loop.close()


def test_disconnect_resets_the_devices(env: Env) -> None:
    with env.driver() as drv:
        blk_ready(drv, env.carve)
        assert env.bus.devices[0].status & p.STATUS_DRIVER_OK
    env.wait(lambda: env.bus.devices[0].status == 0)
    assert env.bus.devices[0].vqs[0].queue is None


def test_a_doorbell_with_one_event_avail_is_served_as_poll_would(tmp_path: Path) -> None:
    """The doorbell's short path (one EVENT_AVAIL waiting) serves the request and answers
    exactly as poll() does; anything else it leaves untouched for poll()."""
    carve_file = tmp_path / "carveout"
    carve_file.write_bytes(bytes(CARVEOUT))
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(range(256)) * 2 * 8)
    mem, loop = map_carveout(carve_file, BASE), Loop()
    bus = MsgBus([BlockDevice(str(disk))], mem, loop)
    try:
        dev, drv = bus.devices[0], DriverQueue(mem, 16, base=BASE)
        dev.driver_features = 1 << 32
        dev.status = p.STATUS_FEATURES_OK | p.STATUS_DRIVER_OK
        ring = {"desc": drv.desc, "driver": drv.avail, "device": drv.used}
        dev.handle(
            p.request(MsgId.SET_VQUEUE, 0, 1, index=0, reserved0=0, size=16, reserved1=0, **ring)
        )
        to_dev, to_drv = bus.msgmem.to_device, bus.msgmem.to_driver

        def avail(index: int = 0) -> bytes:
            return p.encode(p.event(MsgId.EVENT_AVAIL, 0, index=index, next=0))

        for sector in (0, 1, 2):
            drv.reset_data()
            drv.add([struct.pack("<IIQ", T_IN, 0, sector)], [512, 1])
            to_dev.put(avail())
            assert bus._one_avail()
            assert to_dev.tail == to_dev.head  # consumed
            [(_head, written)] = drv.get_used()
            assert written == 513
            used = p.decode(to_drv.get() or b"")
            assert (used.msg_id, used["index"]) == (MsgId.EVENT_USED, 0)
        assert bus.stats.messages_in == 3 and bus.stats.protocol_errors == 0
        # Not for the short path: a queue that does not exist, two messages, a request.
        status = p.encode(p.request(MsgId.GET_DEVICE_STATUS, 0, 1))
        for batch in ([avail(7)], [avail(), avail()], [status]):
            tail = to_dev.tail
            for raw in batch:
                to_dev.put(raw)
            assert not bus._one_avail() and to_dev.tail == tail
            bus.rung()  # poll() takes them: the bad one discarded and counted
            assert to_dev.tail == to_dev.head
        assert bus.stats.protocol_errors == 1
        # A queue with more than its budget is served on at once, not at the next poll.
        calls = []
        serve = dev.serve

        def budget_spent_once(index: int) -> tuple[bool, bool]:
            calls.append(index)
            return (True, True) if len(calls) == 1 else serve(index)

        dev.serve = budget_spent_once  # type: ignore[method-assign]
        to_dev.put(avail())
        assert bus._one_avail() and calls == [0, 0] and not bus._work
        del dev.serve
        # A hostile producer index: left to poll(), which stops the ring and says why.
        to_dev.poke("prod", to_dev.tail + 1000)
        assert not bus._one_avail()
        bus.rung()
        assert "producer index" in (to_dev.broken or "")
    finally:
        bus.close()
        mem.close()
        loop.close()


# -- hostile input ----------------------------------------------------------------------------


HOSTILE = [
    bytes.fromhex("00020000 0100 0700"),  # msg_size < 8
    bytes.fromhex("00020000 0100 ff00"),  # msg_size beyond the slot
    bytes.fromhex("00020000 0000 0800"),  # request with token 0
    bytes.fromhex("00420000 0500 0c00 00000000"),  # event with a token
    bytes.fromhex("007f0000 0100 0800"),  # unknown event id
    bytes.fromhex("00ff0000 0100 0800"),  # reserved id
    bytes.fromhex("01070000 0100 0c00 00000000"),  # a response from the driver
    bytes.fromhex("02400000 0000 0c00 0000 0100"),  # EVENT_DEVICE from the driver
    bytes.fromhex("00030000 0100 1000 00000000 ffffffff"),  # 4 billion feature blocks
    bytes.fromhex("00050000 0100 1000 ffffffff ffffffff"),  # config read way out of range
    bytes.fromhex("00070900 0100 0800"),  # a device that does not exist
    bytes.fromhex("00410000 0000 1000 07000000 00000000"),  # EVENT_AVAIL for queue 7
    bytes.fromhex("00400000 0000 1800 00000000 00000000 00000000 00000000"),  # EVENT_CONFIG in
    bytes(SLOT_SIZE),
    b"\xff" * SLOT_SIZE,
]


def test_rule_malformed_messages_are_discarded_and_the_bus_keeps_serving(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    with env.driver() as drv:
        for raw in HOSTILE:
            drv.send_raw(raw)
        assert drv.request(MsgId.GET_DEVICE_INFO, 0)["device_id"] == 2
        # Only one answer came back: the config read got an empty (size 0) response.
        answers = drv.stray + drv.events
        assert [m.name for m in answers] == ["VIRTIO_MSG_GET_CONFIG"] and answers[0]["size"] == 0
    assert env.bus.stats.protocol_errors == len(HOSTILE) - 1
    assert "message discarded" in caplog.text


def test_rule_ring_outside_the_carveout_breaks_only_that_queue(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    with env.driver() as drv:
        drv.negotiate(0)
        drv.request(
            MsgId.SET_VQUEUE,
            0,
            index=0,
            size=16,
            desc=0x4000_0000,
            driver=BASE,
            device=BASE + 0x1000,
        )
        status = drv.driver_ok(0)
        assert status & p.STATUS_DEVICE_NEEDS_RESET
        drv.kick(0, 0)
        # the other device still works
        drv.negotiate(1)
        q = DriverQueue(env.carve, 8, base=BASE + (1 << 20))
        drv.setup_queue(1, 0, q)
        drv.driver_ok(1)
        q.add([], [64])
        drv.kick(1, 0)
        drv.wait_used(1, 0)
    broken = env.bus.snapshot()["devices"][0]["broken"]
    assert broken and "0x40000000" in broken[0] and "0x5c000000" in broken[0]
    assert "outside the carve-out" in caplog.text


def test_rule_hostile_chain_outside_the_carveout_is_refused(env: Env) -> None:
    with env.driver() as drv:
        q = blk_ready(drv, env.carve)
        head = q.add([struct.pack("<IIQ", T_IN, 0, 0)], [512, 1])
        q.corrupt_desc(q.read_desc(head)[3], addr=0x1000)  # data buffer points at private RAM
        drv.kick(0, 0)
        env.wait(lambda: env.bus.devices[0].vqs[0].broken is not None)
        assert drv.request(MsgId.GET_DEVICE_STATUS, 0)["status"] & p.STATUS_DEVICE_NEEDS_RESET
    assert "buffer [0x1000, +0x200) lies outside the carve-out" in env.bus.devices[0].broken[0]


def test_rule_producer_index_beyond_the_ring_stops_it(env: Env) -> None:
    with env.driver() as drv:
        drv.msgmem.to_device.poke("prod", 1000)
        drv.ring()
        env.wait(lambda: env.bus.msgmem.to_device.broken is not None)
        assert "producer index 1000" in (env.bus.msgmem.to_device.broken or "")
    env.wait(lambda: env.bus.msgmem.to_device.broken is None)  # reset on disconnect
    with env.driver() as drv:
        assert drv.request(MsgId.GET_DEVICE_INFO, 1)["device_id"] == 4


def test_rule_consumer_index_beyond_the_ring_stops_replies(env: Env) -> None:
    with env.driver() as drv:
        drv.msgmem.to_driver.poke("cons", 0x8000_0000)
        drv.send(p.request(MsgId.GET_DEVICE_STATUS, 0, 1))
        env.wait(lambda: env.bus.msgmem.to_driver.broken is not None)
        assert "consumer index" in (env.bus.msgmem.to_driver.broken or "")
        with pytest.raises(TimeoutError):
            drv.msgmem.to_driver.poke("cons", 0)
            drv.wait_for(lambda m: True, timeout=0.3)


def test_rule_slot_rewritten_after_publication_cannot_hurt(env: Env) -> None:
    """The back-end copies a slot once; a driver racing to rewrite it only garbles that one."""
    with env.driver() as drv:
        stop = threading.Event()
        ring = drv.msgmem.to_device

        def scribble() -> None:
            while not stop.is_set():
                off = ring.slots + (ring.head % ring.nslots) * SLOT_SIZE
                drv.msgmem.to_device._bytes[off : off + 8] = os.urandom(8)

        t = threading.Thread(target=scribble)
        t.start()
        try:
            for _ in range(50):
                drv.send_raw(os.urandom(SLOT_SIZE))
                time.sleep(0.001)
        finally:
            stop.set()
            t.join()
        env.wait(lambda: env.bus.stats.messages_in >= 50)
        assert drv.request(MsgId.GET_DEVICE_INFO, 0)["device_id"] == 2


# -- the back-end process ---------------------------------------------------------------------


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_service_process_serves_and_stops_cleanly(tmp_path: Path, cache: str) -> None:
    """cache=none: the blk queue runs on the asynchronous engine (io_uring or threads)."""
    carve = tmp_path / "carveout"
    with open(carve, "wb") as f:
        f.truncate(CARVEOUT)
    ddir = odirect_dir(tmp_path) if cache == "none" else tmp_path
    if ddir is None:
        pytest.skip("no file system with O_DIRECT here")
    disk = ddir / f"disk-{os.getpid()}.img"
    disk.write_bytes(bytes(1 << 20))
    sock, stats = tmp_path / "msg.sock", tmp_path / "stats.json"
    cmd = [sys.executable, "-m", "edgevirt.backend.transport.virtio_msg", "--socket", str(sock),
           "--carveout-file", str(carve), "--carveout-base", hex(BASE), "--device",
           f"blk:path={disk},cache={cache}", "--device", "rng", "--stats", str(stats)]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not stats.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        mem = map_carveout(carve, BASE)
        with MsgDriver(str(sock), mem) as drv:
            q = blk_ready(drv, mem)
            data = os.urandom(8192)
            assert blk_io(drv, q, T_OUT, 0, data)[0] == 0
            assert blk_io(drv, q, T_IN, 0, n=8192) == (0, data)
        mem.close()
        assert hashlib.sha256(disk.read_bytes()[:8192]).digest() == hashlib.sha256(data).digest()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err.decode()
    assert not sock.exists()
    import json

    snap = json.loads(stats.read_text())
    assert snap["transport"] == "virtio-msg" and snap["devices"][0]["requests"] == 2
    assert snap["devices"][0]["mapped_bytes"] == CARVEOUT
    want = "io_uring" if no_uring() is None else "threads"
    assert snap["devices"][0]["queues"][0]["io"] == (want if cache == "none" else None)
    disk.unlink()
