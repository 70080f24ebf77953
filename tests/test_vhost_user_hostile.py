"""Hostile guest through the vhost-user back-end: one malicious ring per rule (DESIGN §6).

For each: the queue is marked broken with the rule's message, the process keeps serving
(another device on the same loop answers), the blk disk is untouched, and the back-end
wrote nothing into guest memory outside the used ring of the broken queue.
"""

import threading
import time

import pytest

from edgevirt.backend.devices import BlockDevice, RngDevice
from edgevirt.backend.devices import blk as b
from edgevirt.backend.loop import Loop
from edgevirt.backend.transport.vhost_user.backend import VhostUserBackend
from edgevirt.backend.transport.vhost_user.frontend import VhostUserFrontend
from edgevirt.backend.virtq.pyring import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE

HDR = b.REQ_HEADER.pack(b.T_OUT, 0, 0)


def head_out_of_range(drv):
    drv.write_avail_entry(0, drv.size + 3)
    return "head"


def next_out_of_range(drv):
    a = drv.alloc(16, HDR)
    drv.write_desc(0, a, 16, DESC_F_NEXT, drv.size + 1)
    drv.write_avail_entry(0, 0)
    return "next"


def descriptor_loop(drv):
    a = drv.alloc(16, HDR)
    drv.write_desc(0, a, 16, DESC_F_NEXT, 1)
    drv.write_desc(1, a, 16, DESC_F_NEXT, 0)
    drv.write_avail_entry(0, 0)
    return "loop"


def indirect_nested(drv):
    inner = drv.write_indirect([(drv.alloc(16, HDR), 16, 0, 0)])
    outer = drv.write_indirect([(inner, 16, DESC_F_INDIRECT, 0)])
    drv.write_desc(0, outer, 16, DESC_F_INDIRECT)
    drv.write_avail_entry(0, 0)
    return "indirect"


def indirect_misaligned_len(drv):
    table = drv.write_indirect([(drv.alloc(16, HDR), 16, 0, 0)] * 2)
    drv.write_desc(0, table, 24, DESC_F_INDIRECT)
    drv.write_avail_entry(0, 0)
    return "multiple of 16"


def indirect_with_next(drv):
    table = drv.write_indirect([(drv.alloc(16, HDR), 16, 0, 0)])
    drv.write_desc(0, table, 16, DESC_F_INDIRECT | DESC_F_NEXT, 1)
    drv.write_avail_entry(0, 0)
    return "INDIRECT combined with NEXT"


def readable_after_writable(drv):
    drv.write_desc(0, drv.alloc(1), 1, DESC_F_WRITE | DESC_F_NEXT, 1)
    drv.write_desc(1, drv.alloc(16, HDR), 16, 0)
    drv.write_avail_entry(0, 0)
    return "device-readable after device-writable"


def zero_length(drv):
    drv.write_desc(0, drv.alloc(16, HDR), 0, 0)
    drv.write_avail_entry(0, 0)
    return "length 0"


def address_wraps(drv):
    drv.write_desc(0, 2**64 - 8, 16, 0)
    drv.write_avail_entry(0, 0)
    return "outside the carve-out"


def buffer_outside_carveout(drv):
    drv.write_desc(0, 0x40000000, 512, 0)  # private guest RAM (NUMA node 0)
    drv.write_avail_entry(0, 0)
    return "0x40000000"


def buffer_straddles_end(drv):
    end = drv.data_end
    drv.write_desc(0, end - 8, 16, 0)
    drv.write_avail_entry(0, 0)
    return "outside the carve-out"


def avail_idx_jump(drv):
    drv.avail_idx = drv.size + 7
    return "more than queue size"


def chain_of_4gib(drv):
    a = drv.alloc(16, HDR)
    big = drv.alloc(4096)
    # Two writable descriptors of 2^31 + ... each pointing at the same small buffer would
    # leave the mapping first; lengths that fit the carve-out but add up past 2^32 need
    # many descriptors: 1 MiB x 4097 via an indirect table.
    n = (1 << 32) // (1 << 20) + 1
    table = [(big, 1 << 20, DESC_F_WRITE | DESC_F_NEXT, k + 1) for k in range(n)]
    table[-1] = (big, 1 << 20, DESC_F_WRITE, 0)
    table = [(a, 16, DESC_F_NEXT, 1)] + [(x, y, z, w + 1) for x, y, z, w in table]
    drv.write_desc(0, drv.write_indirect(table), 16 * len(table), DESC_F_INDIRECT)
    drv.write_avail_entry(0, 0)
    return "2^32"


RULES = [
    head_out_of_range, next_out_of_range, descriptor_loop, indirect_nested,
    indirect_misaligned_len, indirect_with_next, readable_after_writable, zero_length,
    address_wraps, buffer_outside_carveout, buffer_straddles_end, avail_idx_jump, chain_of_4gib,
]  # fmt: skip


@pytest.fixture
def pair(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    loop = Loop()
    blk = VhostUserBackend(BlockDevice(str(disk)), str(tmp_path / "blk.sock"), loop)
    rng = VhostUserBackend(RngDevice(), str(tmp_path / "rng.sock"), loop)
    t = threading.Thread(target=loop.run, daemon=True)
    t.start()
    yield blk, rng, disk
    loop.stop()
    t.join(5)
    blk.close()
    rng.close()


@pytest.mark.parametrize("rule", RULES, ids=[r.__name__ for r in RULES])
def test_rule_hostile_ring_breaks_only_that_queue(pair, rule):
    blk, rng, disk = pair
    fe = VhostUserFrontend(blk.path, size=128 << 20 if rule is chain_of_4gib else 4 << 20)
    fe.negotiate()
    fe.set_mem_table()
    drv = fe.setup_vring(0).driver
    expect = rule(drv)
    drv.set_avail_idx(drv.avail_idx + 1 if rule is not avail_idx_jump else drv.avail_idx)
    before = bytes(fe.region.buf)
    fe.kick(0)
    deadline = time.monotonic() + 5
    while not blk.snapshot()["broken"] and time.monotonic() < deadline:
        time.sleep(0.005)
    broken = blk.snapshot()["broken"]
    assert broken and expect in broken[0], broken
    assert blk.snapshot()["queues"][0]["broken"]
    assert drv.get_used() == []
    # Only the broken queue's used ring may have changed (avail_event, flags).
    after = bytes(fe.region.buf)
    base = fe.region.gpa
    changed = [i for i in range(0, len(after), 4096) if after[i : i + 4096] != before[i : i + 4096]]
    used_lo, used_hi = drv.used - base, drv.used - base + 6 + 8 * drv.size
    for page in changed:
        diff = [i for i in range(page, page + 4096) if after[i] != before[i]]
        assert all(used_lo <= i < used_hi for i in diff), (hex(diff[0]), hex(used_lo))
    assert disk.read_bytes() == bytes(1 << 20)
    # A kick on the broken queue changes nothing; the other device still serves.
    fe.kick(0)
    fe2 = VhostUserFrontend(rng.path)
    fe2.negotiate()
    fe2.set_mem_table()
    fe2.setup_vring(0)
    fe2.vrings[0].driver.add([], [64])
    fe2.kick(0)
    assert fe2.wait_call(0)
    fe2.close()
    fe.close()
