"""virtio-blk through real vhost-user rings: every request type, config, multiqueue, strict
request layouts (the answer is a status byte, the queue survives)."""

import os
import struct
import threading

import pytest

from edgevirt.backend.devices import BlockDevice, parse_device
from edgevirt.backend.devices import blk as b
from edgevirt.backend.loop import Loop
from edgevirt.backend.transport.vhost_user.backend import VhostUserBackend
from edgevirt.backend.transport.vhost_user.frontend import VhostUserFrontend
from edgevirt.errors import ConfigError

DISK = 1 << 20
SECTORS = DISK // 512


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(DISK))
    return path


def serve(tmp_path, device):
    loop = Loop()
    be = VhostUserBackend(device, str(tmp_path / f"{device.name}.sock"), loop)
    t = threading.Thread(target=loop.run, daemon=True)
    t.start()
    return loop, t, be


@pytest.fixture
def blk(tmp_path, disk):
    loop, t, be = serve(tmp_path, BlockDevice(str(disk), num_queues=2))
    fe = VhostUserFrontend(be.path)
    fe.negotiate()
    fe.set_mem_table()
    fe.setup_vring(0)
    yield fe, be
    fe.close()
    loop.stop()
    t.join(5)
    be.close()


def request(fe, rtype, sector=0, data=b"", read_len=0, queue=0, status_len=1):
    """Submit one request; returns (status, written_len, read data)."""
    drv = fe.vrings[queue].driver
    drv.reset_data()
    readable = [b.REQ_HEADER.pack(rtype, 0, sector)] + ([data] if data else [])
    writable = ([read_len] if read_len else []) + [status_len]
    head = drv.add(readable, writable)
    fe.kick(queue)
    assert fe.wait_call(queue), "no used notification"
    [(h, written)] = drv.get_used()
    assert h == head
    idx = drv.read_desc(head)[3] if not data else drv.read_desc(drv.read_desc(head)[3])[3]
    got = b""
    if read_len:
        got = drv.read(drv.read_desc(idx)[0], read_len)
        idx = drv.read_desc(idx)[3]
    addr, length, _, _ = drv.read_desc(idx)
    return drv.read(addr + length - 1, 1)[0], written, got


def dwz(sector, num, flags=0):
    return b.DWZ_SEGMENT.pack(sector, num, flags)


def test_config_space_fields(blk):
    fe, _ = blk
    cfg = fe.get_config(b.CONFIG_SIZE)
    f = b.CONFIG.unpack(cfg)
    cap, size_max, seg_max, blk_size, nq = f[0], f[1], f[2], f[6], f[13]
    max_discard, max_discard_seg, align, max_wz, max_wz_seg, may_unmap = f[14:20]
    assert cap == SECTORS and seg_max == 126 and blk_size == 512 and nq == 2
    assert max_discard == max_wz == b.MAX_DWZ_SECTORS and max_discard_seg == max_wz_seg == 1
    assert align == 1 and may_unmap == 1 and size_max == 0
    # QEMU may ask for a longer (newer) struct: the rest reads as zero.
    assert fe.get_config(72)[60:] == bytes(12)


def test_features_advertise_discard_write_zeroes_mq(blk):
    _, be = blk
    for bit in (b.F_DISCARD, b.F_WRITE_ZEROES, b.F_MQ, b.F_FLUSH, b.F_SEG_MAX, b.F_BLK_SIZE):
        assert be.offered_features >> bit & 1, bit


def test_write_read_flush_get_id(blk, disk):
    fe, be = blk
    data = os.urandom(8192)
    assert request(fe, b.T_OUT, 16, data=data)[:2] == (b.S_OK, 1)
    status, written, got = request(fe, b.T_IN, 16, read_len=8192)
    assert (status, written, got) == (b.S_OK, 8193, data)
    assert request(fe, b.T_FLUSH)[0] == b.S_OK
    status, written, got = request(fe, b.T_GET_ID, read_len=20)
    assert status == b.S_OK and got == b"edgevirt".ljust(20, b"\0")
    assert disk.read_bytes()[16 * 512 : 16 * 512 + 8192] == data
    by_type = be.snapshot()["by_type"]
    assert by_type == {"write": 1, "read": 1, "flush": 1, "get_id": 1}


def test_discard_punches_hole_and_write_zeroes_zeroes(blk, disk):
    fe, _ = blk
    assert request(fe, b.T_WRITE_ZEROES, data=dwz(8, 16))[0] == b.S_OK
    assert disk.read_bytes()[8 * 512 : 24 * 512] == bytes(16 * 512)
    assert request(fe, b.T_WRITE_ZEROES, data=dwz(100, 8, b.DWZ_F_UNMAP))[0] == b.S_OK
    assert disk.read_bytes()[100 * 512 : 108 * 512] == bytes(8 * 512)
    # Discard of a whole 4 KiB-aligned range deallocates it in a sparse file (reads zero).
    before = os.stat(disk).st_blocks
    assert request(fe, b.T_DISCARD, data=dwz(512, 256))[0] == b.S_OK
    assert os.stat(disk).st_blocks < before
    assert disk.read_bytes()[512 * 512 : 768 * 512] == bytes(256 * 512)
    # Neighbours untouched.
    assert disk.read_bytes()[511 * 512 : 512 * 512] != bytes(512)


def test_discard_with_unmap_flag_or_unknown_flag_is_unsupp(blk):
    fe, _ = blk
    assert request(fe, b.T_DISCARD, data=dwz(0, 8, b.DWZ_F_UNMAP))[0] == b.S_UNSUPP
    assert request(fe, b.T_WRITE_ZEROES, data=dwz(0, 8, 0x80))[0] == b.S_UNSUPP


def test_discard_beyond_capacity_or_too_many_segments_is_ioerr(blk, disk):
    fe, _ = blk
    before = disk.read_bytes()
    assert request(fe, b.T_DISCARD, data=dwz(SECTORS - 4, 8))[0] == b.S_IOERR
    assert request(fe, b.T_WRITE_ZEROES, data=dwz(2**64 - 1, 2))[0] == b.S_IOERR
    assert request(fe, b.T_WRITE_ZEROES, data=dwz(0, 8) + dwz(16, 8))[0] == b.S_IOERR
    assert request(fe, b.T_DISCARD, data=b"\0" * 10)[0] == b.S_IOERR  # not a multiple of 16
    assert disk.read_bytes() == before


@pytest.mark.parametrize(
    "rtype, kw",
    [
        (b.T_IN, {"read_len": 100}),  # not a multiple of 512
        (b.T_IN, {"read_len": 512, "data": b"x" * 512}),  # read with device-readable data
        (b.T_OUT, {"data": b"x" * 512, "read_len": 512}),  # write with device-writable data
        (b.T_OUT, {"data": b"x" * 700}),
        (b.T_FLUSH, {"data": b"x" * 512}),
        (b.T_GET_ID, {"read_len": 8}),  # id buffer shorter than 20 bytes
    ],
)
def test_rule_request_layout_is_ioerr_and_queue_keeps_serving(blk, disk, rtype, kw):
    fe, be = blk
    before = disk.read_bytes()
    assert request(fe, rtype, 0, **kw)[0] == b.S_IOERR
    assert disk.read_bytes() == before
    assert request(fe, b.T_OUT, 0, data=b"y" * 512)[0] == b.S_OK
    assert be.snapshot()["broken"] == []


def test_rule_beyond_capacity_read_write_is_ioerr(blk, disk):
    fe, _ = blk
    before = disk.read_bytes()
    assert request(fe, b.T_OUT, SECTORS - 1, data=b"z" * 1024)[0] == b.S_IOERR
    assert request(fe, b.T_IN, 2**64 - 1, read_len=512)[0] == b.S_IOERR
    assert disk.read_bytes() == before


def test_unknown_type_is_unsupp(blk):
    fe, _ = blk
    assert request(fe, 99)[0] == b.S_UNSUPP


def test_rule_too_many_segments_is_ioerr(tmp_path, disk):
    loop, t, be = serve(tmp_path, BlockDevice(str(disk), seg_max=2))
    fe = VhostUserFrontend(be.path)
    try:
        fe.negotiate()
        fe.set_mem_table()
        fe.setup_vring(0)
        drv = fe.vrings[0].driver
        head = drv.add([b.REQ_HEADER.pack(b.T_IN, 0, 0)], [512, 512, 512, 1])
        fe.kick(0)
        assert fe.wait_call(0)
        assert drv.get_used() == [(head, 1)]
        assert be.device.stats.errors == 1
    finally:
        fe.close()
        loop.stop()
        t.join(5)
        be.close()


def test_multiqueue_both_queues_serve(blk, disk):
    fe, be = blk
    fe.setup_vring(1, base=0x5C000000 + (1 << 20))
    a, c = os.urandom(512), os.urandom(512)
    assert request(fe, b.T_OUT, 1, data=a, queue=0)[0] == b.S_OK
    assert request(fe, b.T_OUT, 2, data=c, queue=1)[0] == b.S_OK
    assert request(fe, b.T_IN, 1, read_len=512, queue=1)[2] == a
    assert request(fe, b.T_IN, 2, read_len=512, queue=0)[2] == c
    queues = be.snapshot()["queues"]
    assert [q["served"] for q in queues] == [2, 2]
    # A request can be served by the serve loop of the previous kick before its own kick is
    # read, so only one kick per queue is certain by now.
    assert all(q["kicks"] >= 1 and q["notifications"] >= 2 for q in queues), queues


def test_readonly_refuses_writes_and_offers_ro(tmp_path, disk):
    dev = BlockDevice(str(disk), readonly=True)
    assert dev.features >> b.F_RO & 1 and not dev.features >> b.F_DISCARD & 1
    dev.close()


def test_parse_device_options(disk):
    dev = parse_device(f"blk:path={disk},queues=4,seg_max=64,discard=off,serial=abc")
    assert isinstance(dev, BlockDevice)
    assert (dev.num_queues, dev.seg_max, dev.serial) == (4, 64, b"abc")
    assert not dev.features >> b.F_DISCARD & 1
    assert struct.unpack_from("<H", dev.config(), 34)[0] == 4
    dev.close()
    bad_specs = ["queues=0", "bogus=1", "discard=maybe", "queues=x"]
    for bad in [f"blk:path={disk},{o}" for o in bad_specs] + ["rng:x=1"]:
        with pytest.raises(ConfigError):
            parse_device(bad)
