"""Split virtqueue: one suite for both implementations, plus differential property tests.

Every behaviour test takes the ``impl`` fixture (the C class and the Python class). Negative
tests are named after the rule they check (``test_rule_<rule>``). The hypothesis tests feed
the same random, often hostile, rings to both implementations and require identical results
or identical errors, and identical guest memory afterwards.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgevirt.backend.memory import GuestMemory, Region, anonymous, memfd_region
from edgevirt.backend.virtq import IMPLEMENTATIONS, SplitQueue
from edgevirt.backend.virtq.driver import DriverQueue
from edgevirt.backend.virtq.pyring import (
    BATCH_CHAIN,
    BATCH_SEGMENT,
    DESC,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    POP_SEGMENT_BUDGET,
    USED_ELEM,
)
from edgevirt.errors import GuestMemoryError, RingError

BASE = 0x4000_0000
MEM_SIZE = 1 << 16
NEXT, WRITE, INDIRECT = DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT


@pytest.fixture(params=["c", "python"])
def impl(request: pytest.FixtureRequest) -> Any:
    if request.param not in IMPLEMENTATIONS:
        pytest.skip("C extension not built (pip install -e . or setup.py build_ext --inplace)")
    return IMPLEMENTATIONS[request.param]


def setup(impl: Any, size: int = 8, *, event_idx: bool = False, mem_size: int = MEM_SIZE):
    mem = GuestMemory()
    mem.add(Region(BASE, mem_size, bytearray(mem_size)))
    drv = DriverQueue(mem, size, event_idx=event_idx)
    return mem, drv, drv.queue(impl)


def snapshot(mem: GuestMemory) -> list[bytes]:
    """The contents of the small regions (big sparse ones hold buffers, never rings)."""
    return [bytes(r.buf) for r in mem.regions if r.size <= MEM_SIZE]


def expect_rule(q: Any, mem: GuestMemory, rule: str, *words: str) -> RingError:
    """pop() must raise ``rule``, write nothing, move no index, and break the queue."""
    before, last = snapshot(mem), q.last_avail_idx
    with pytest.raises(RingError) as info:
        q.pop(mem)
    assert info.value.rule == rule
    for word in words:
        assert word in str(info.value)
    assert snapshot(mem) == before and q.last_avail_idx == last
    assert q.broken == str(info.value)
    with pytest.raises(RingError) as again:
        q.pop(mem)
    assert again.value.rule == "broken" and str(info.value) in str(again.value)
    return info.value


# ---- selection and attributes ----


def test_default_implementation_is_c_when_built() -> None:
    assert "python" in IMPLEMENTATIONS
    c_default = "c" in IMPLEMENTATIONS and os.environ.get("EDGEVIRT_RING") != "python"
    assert SplitQueue is IMPLEMENTATIONS["c" if c_default else "python"]


def test_env_forces_python() -> None:
    code = "from edgevirt.backend.virtq import SplitQueue as Q; print(Q.__module__)"
    env = dict(os.environ, EDGEVIRT_RING="python")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "edgevirt.backend.virtq.pyring", out.stderr


def test_attributes(impl: Any) -> None:
    q = impl(256, 0x1000, 0x2000, 0x3000, event_idx=True)
    assert (q.size, q.desc, q.avail, q.used) == (256, 0x1000, 0x2000, 0x3000)
    assert (q.last_avail_idx, q.used_idx, q.event_idx, q.broken) == (0, 0, True, None)
    for name in ("size", "desc", "avail", "used", "broken"):
        with pytest.raises(AttributeError):
            setattr(q, name, 1)
    q.last_avail_idx, q.used_idx, q.event_idx = 65535, 7, False
    assert (q.last_avail_idx, q.used_idx, q.event_idx) == (65535, 7, False)
    for bad in (-1, 65536):
        with pytest.raises(OverflowError):
            q.used_idx = bad
    with pytest.raises(TypeError):
        q.last_avail_idx = 1.5
    assert repr(q) == "<SplitQueue size=256 last_avail_idx=65535 used_idx=7>"
    assert impl(1, 0, 0, 0).size == 1 and impl(32768, 0, 0, 0).size == 32768


@pytest.mark.parametrize("size", [0, 3, 12, 65536, -8, 1 << 70])
def test_rule_size(impl: Any, size: int) -> None:
    with pytest.raises(RingError) as info:
        impl(size, 0, 0, 0)
    assert info.value.rule == "size" and str(size) in str(info.value)


def expect_align(impl: Any, rule: str, args: tuple[int, int, int]) -> None:
    with pytest.raises(RingError) as info:
        impl(8, *args)
    assert info.value.rule == rule and hex(max(args)) in str(info.value)


def test_rule_desc_align(impl: Any) -> None:
    expect_align(impl, "desc_align", (0x1008, 0, 0))


def test_rule_avail_align(impl: Any) -> None:
    expect_align(impl, "avail_align", (0, 0x1001, 0))


def test_rule_used_align(impl: Any) -> None:
    expect_align(impl, "used_align", (0, 0, 0x1002))


def test_constructor_types(impl: Any) -> None:
    with pytest.raises(OverflowError):
        impl(8, -16, 0, 0)
    with pytest.raises(OverflowError):
        impl(8, 0, 1 << 64, 0)
    with pytest.raises(TypeError):
        impl(8, 0.0, 0, 0)


# ---- the ring calls ----


def test_pop_direct_chain(impl: Any) -> None:
    mem, drv, q = setup(impl)
    assert q.pending(mem) == 0 and q.pop(mem) == []
    head = drv.add([b"hello", b"world!"], [16, 32])
    assert q.pending(mem) == 1
    [(h, readable, writable)] = q.pop(mem)
    assert h == head
    assert [drv.read(a, n) for a, n in readable] == [b"hello", b"world!"]
    assert [n for _, n in writable] == [16, 32]
    assert q.last_avail_idx == 1 and q.pending(mem) == 0 and q.pop(mem) == []


def test_pop_many_and_max_chains(impl: Any) -> None:
    mem, drv, q = setup(impl)
    heads = [drv.add([bytes([i])]) for i in range(5)]
    assert q.pending(mem) == 5
    got = q.pop(mem, 2)
    assert [c[0] for c in got] == heads[:2] and q.pending(mem) == 3
    assert [c[0] for c in q.pop(mem, max_chains=10)] == heads[2:]
    with pytest.raises(ValueError):
        q.pop(mem, -1)
    assert q.broken is None


def test_pop_indirect_chain(impl: Any) -> None:
    mem, drv, q = setup(impl)
    head = drv.add([b"req"], [8, 8], indirect=True)
    [(h, readable, writable)] = q.pop(mem)
    assert h == head and drv.read(*readable[0]) == b"req" and len(writable) == 2
    assert drv.read_desc(head)[2] == INDIRECT


def test_pop_direct_then_indirect(impl: Any) -> None:
    """A chain may continue from the ring's table into an indirect table."""
    mem, drv, q = setup(impl)
    buf = drv.alloc(64)
    table = drv.write_indirect([(buf + 16, 8, NEXT, 1), (buf + 32, 8, WRITE, 0)])
    drv.write_desc(3, buf, 16, NEXT, 5)
    drv.write_desc(5, table, 32, INDIRECT | WRITE, 0)  # WRITE on an indirect desc is ignored
    drv.make_available(3)
    assert q.pop(mem) == [(3, [(buf, 16), (buf + 16, 8)], [(buf + 32, 8)])]


def test_push_publishes_used(impl: Any) -> None:
    mem, drv, q = setup(impl)
    heads = [drv.add([b"x"], [64]) for _ in range(3)]
    q.pop(mem)
    before = snapshot(mem)
    q.push(mem, [])
    assert snapshot(mem) == before and q.used_idx == 0
    q.push(mem, [(heads[1], 10), (heads[0], 0)])
    q.push(mem, iter([(heads[2], 0xFFFFFFFF)]))
    assert q.used_idx == drv.used_idx == 3
    assert drv.get_used() == [(heads[1], 10), (heads[0], 0), (heads[2], 0xFFFFFFFF)]


def unbatch(chains: bytes, segs: bytes) -> list[tuple[int, list, list]]:
    """pop_batch()'s records back into pop()'s chains."""
    flat = [tuple(s) for s in BATCH_SEGMENT.iter_unpack(segs)]
    out = []
    for head, nread, nwrite, first in BATCH_CHAIN.iter_unpack(chains):
        out.append((head, flat[first : first + nread],
                    flat[first + nread : first + nread + nwrite]))  # fmt: skip
    assert sum(len(r) + len(w) for _, r, w in out) == len(flat)
    return out


def test_pop_batch_is_pop_in_records(impl: Any) -> None:
    mem, drv, q = setup(impl, size=16)
    mem2, drv2, q2 = setup(impl, size=16)
    for d in (drv, drv2):
        d.add([b"hello", b"world!"], [16, 32])
        d.add([b"req"], [8, 8], indirect=True)
        d.add([b"x"])
        d.add([], [7])
    assert unbatch(*q.pop_batch(mem, 3)) == q2.pop(mem2, 3)
    assert unbatch(*q.pop_batch(mem)) == q2.pop(mem2)
    assert q.pop_batch(mem) == (b"", b"") and q.last_avail_idx == q2.last_avail_idx == 4
    with pytest.raises(ValueError):
        q.pop_batch(mem, -1)
    assert q.broken is None


def test_push_batch_publishes_used(impl: Any) -> None:
    import array

    mem, drv, q = setup(impl)
    heads = [drv.add([b"x"], [64]) for _ in range(3)]
    q.pop_batch(mem)
    q.push_batch(mem, b"")
    assert q.used_idx == 0 and drv.used_idx == 0
    q.push_batch(mem, USED_ELEM.pack(heads[1], 10) + USED_ELEM.pack(heads[0], 0))
    q.push_batch(mem, memoryview(array.array("I", [heads[2], 0xFFFFFFFF])))
    assert q.used_idx == drv.used_idx == 3
    assert drv.get_used() == [(heads[1], 10), (heads[0], 0), (heads[2], 0xFFFFFFFF)]


def test_push_batch_arguments_do_not_break(impl: Any) -> None:
    mem, drv, q = setup(impl, size=4)
    for used in (USED_ELEM.pack(4, 0), USED_ELEM.pack(0, 0) * 5, b"\0" * 7, "text", 5):
        with pytest.raises((ValueError, TypeError)):
            q.push_batch(mem, used)
    with pytest.raises(ValueError, match="completion 1: head out of range 0..3"):
        q.push_batch(mem, USED_ELEM.pack(0, 0) + USED_ELEM.pack(9, 0))
    assert q.broken is None and q.used_idx == 0 and drv.used_idx == 0


def test_index_wraparound(impl: Any) -> None:
    mem, drv, q = setup(impl, size=4)
    for idx in (65534, 65533):  # any start: avail idx and used idx are free-running u16
        drv.avail_idx = drv.last_used_idx = idx
        drv.publish()
        q.last_avail_idx = q.used_idx = idx
        for _ in range(3):
            heads = [drv.add([b"a"], [1], indirect=True) for _ in range(3)]
            assert [c[0] for c in q.pop(mem)] == heads
            q.push(mem, [(h, 1) for h in heads])
            assert drv.get_used() == [(h, 1) for h in heads]
        assert q.last_avail_idx == q.used_idx == (idx + 9) & 0xFFFF


def test_push_arguments_do_not_break(impl: Any) -> None:
    mem, drv, q = setup(impl, size=4)
    bad: list[Any] = [
        [(4, 0)],
        [(-1, 0)],
        [(0, 1 << 32)],
        [(0, -1)],
        [(0, 0)] * 5,
        [(0,)],
        [3],
        5,
        [("a", 0)],
    ]
    for completions in bad:
        with pytest.raises((ValueError, TypeError)):
            q.push(mem, completions)
    assert q.broken is None and q.used_idx == 0 and drv.used_idx == 0


def test_should_notify_flags(impl: Any) -> None:
    mem, drv, q = setup(impl)
    head = drv.add([b"a"])
    q.pop(mem)
    assert not q.should_notify(mem)  # nothing pushed yet
    q.push(mem, [(head, 0)])
    assert q.should_notify(mem)
    assert not q.should_notify(mem)  # already signalled
    drv.set_avail_flags(1)  # VRING_AVAIL_F_NO_INTERRUPT
    q.push(mem, [(head, 0)])
    assert not q.should_notify(mem)


def test_should_notify_event_idx(impl: Any) -> None:
    mem, drv, q = setup(impl, event_idx=True)
    drv.set_avail_flags(1)  # ignored with event_idx
    drv.set_used_event(0)
    q.push(mem, [(0, 0)])  # used idx 0 -> 1 crosses used_event 0
    assert q.should_notify(mem)
    drv.set_used_event(5)
    q.push(mem, [(0, 0)])  # 1 -> 2
    assert not q.should_notify(mem)
    q.push(mem, [(0, 0)] * 4)  # 2 -> 6 crosses 5
    assert q.should_notify(mem)
    q.used_idx = 100  # SET_VRING_BASE: counting starts again from the new base
    drv.set_used_event(99)
    assert not q.should_notify(mem)


def test_event_idx_pop_writes_avail_event(impl: Any) -> None:
    mem, drv, q = setup(impl, event_idx=True)
    for _ in range(3):
        drv.add([b"a"])
    q.pop(mem, 2)
    assert drv.avail_event == 2
    q.pop(mem)
    assert drv.avail_event == 3


def test_set_notification(impl: Any) -> None:
    mem, drv, q = setup(impl)
    drv.write(drv.used, b"\x04\x00")  # another flag bit survives
    q.set_notification(mem, False)
    assert drv.used_flags == 5
    q.set_notification(mem, True)
    assert drv.used_flags == 4
    mem2, drv2, q2 = setup(impl, event_idx=True)
    drv2.add([b"a"])
    q2.pop(mem2)
    drv2.write(drv2.used + 4 + 8 * drv2.size, b"\x09\x00")
    before = snapshot(mem2)
    q2.set_notification(mem2, False)  # nothing to do: pop keeps avail_event current
    assert snapshot(mem2) == before
    q2.set_notification(mem2, True)
    assert drv2.avail_event == 1 and drv2.used_flags == 0


def test_mmap_views_released(impl: Any) -> None:
    """Buffers are held for one call only, on success and on error."""
    mem = GuestMemory()
    region = anonymous(BASE, 1 << 16)
    mem.add(region)
    drv = DriverQueue(mem, 8)
    q = drv.queue(impl)
    drv.add([b"a"], [1])
    assert len(q.pop(mem)) == 1
    drv.set_avail_idx(100)
    with pytest.raises(RingError):
        q.pop(mem)
    mem.close()  # mmap.close() raises BufferError if an export were still alive


def test_memory_table_errors_do_not_break(impl: Any) -> None:
    q = impl(8, BASE, BASE + 128, BASE + 256)

    class Table:
        def __init__(self, table: Any) -> None:
            self.table = table

    for table, exc in [
        (5, TypeError),
        ([(BASE,)], TypeError),
        ([[BASE, bytearray(16)]], TypeError),
        ([("x", bytearray(16))], TypeError),
        ([(BASE, b"read-only")], BufferError),
        ([(-1, bytearray(16))], OverflowError),
        ([((1 << 64) - 8, bytearray(16))], ValueError),
    ]:
        with pytest.raises(exc):
            q.pop(Table(table))
    with pytest.raises(AttributeError):
        q.pending(object())
    assert q.broken is None


def test_threads(impl: Any) -> None:
    """Queues on other threads run while the C code has released the GIL."""
    results: dict[int, list[int]] = {}

    def work(n: int) -> None:
        mem, drv, q = setup(impl, size=64)
        heads = []
        for _ in range(50):
            heads += [drv.add([b"r"], [8], indirect=True) for _ in range(8)]
            got = q.pop(mem)
            q.push(mem, [(c[0], 8) for c in got])
            drv.get_used()
            drv.reset_data()
            results.setdefault(n, []).extend(c[0] for c in got)
        assert results[n] == heads

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(len(v) == 400 for v in results.values())


def test_pop_segment_budget(impl: Any) -> None:
    """Heads sharing one 65535-entry indirect table: pop() returns a bounded batch."""
    mem, drv, q = setup(impl, size=4, mem_size=2 << 20)
    buf = drv.alloc(16)
    table = drv.write_indirect([(buf, 1, NEXT, k + 1) for k in range(65534)] + [(buf, 1, 0, 0)])
    drv.write_desc(0, table, 16 * 65535, INDIRECT)
    for _ in range(4):
        drv.make_available(0)
    first = q.pop(mem)
    assert len(first) == 2 and POP_SEGMENT_BUDGET == 65536
    assert len(first[0][1]) == 65535 and q.pending(mem) == 2
    assert len(q.pop(mem)) == 2


# ---- one negative test per rule ----


def test_rule_avail_idx(impl: Any) -> None:
    mem, drv, q = setup(impl)
    drv.set_avail_idx(9)
    with pytest.raises(RingError) as info:
        q.pending(mem)
    assert info.value.rule == "avail_idx" and "9" in str(info.value)
    mem, drv, q = setup(impl)
    q.last_avail_idx = 100
    drv.set_avail_idx(99)  # behind = 65535 ahead
    expect_rule(q, mem, "avail_idx", "65535", "queue size 8")


def test_rule_head(impl: Any) -> None:
    mem, drv, q = setup(impl)
    drv.add([b"ok"])
    drv.make_available(8)
    assert expect_rule(q, mem, "head", "slot 1", "head 8").rule == "head"


def test_rule_next(impl: Any) -> None:
    mem, drv, q = setup(impl)
    head = drv.add([b"a", b"b"])
    drv.corrupt_desc(head, next=8)
    expect_rule(q, mem, "next", "next 8 >= table size 8")
    mem, drv, q = setup(impl)
    buf = drv.alloc(8)
    drv.write_desc(0, drv.write_indirect([(buf, 8, NEXT, 2), (buf, 8, 0, 0)]), 32, INDIRECT)
    drv.make_available(0)
    expect_rule(q, mem, "next", "indirect descriptor 0", "next 2 >= table size 2")


def test_rule_loop(impl: Any) -> None:
    mem, drv, q = setup(impl, size=4)
    buf = drv.alloc(8)
    drv.write_desc(1, buf, 8, NEXT, 2)
    drv.write_desc(2, buf, 8, NEXT, 1)
    drv.make_available(1)
    expect_rule(q, mem, "loop", "chain 1", "more than 4")
    mem, drv, q = setup(impl, size=4)
    buf = drv.alloc(8)
    table = drv.write_indirect([(buf, 8, NEXT, 1)] * 6)
    drv.write_desc(0, table, 16 * 6, INDIRECT)
    drv.make_available(0)
    expect_rule(q, mem, "loop", "more than 6", "indirect")


@pytest.mark.parametrize("length", [0, 8, 24, 16 * 65536, 0xFFFFFFF0])
def test_rule_indirect_len(impl: Any, length: int) -> None:
    mem, drv, q = setup(impl)
    drv.write_desc(0, drv.alloc(32), length, INDIRECT)
    drv.make_available(0)
    expect_rule(q, mem, "indirect_len", f"length {length}", str(16 * 65535))


def test_rule_indirect_nested(impl: Any) -> None:
    mem, drv, q = setup(impl)
    inner = drv.write_indirect([(drv.alloc(8), 8, 0, 0)])
    outer = drv.write_indirect([(drv.alloc(8), 8, NEXT, 1), (inner, 16, INDIRECT, 0)])
    drv.write_desc(0, outer, 32, INDIRECT)
    drv.make_available(0)
    expect_rule(q, mem, "indirect_nested", "indirect descriptor 1")


def test_rule_indirect_next(impl: Any) -> None:
    mem, drv, q = setup(impl)
    head = drv.add([b"a"], indirect=True)
    drv.corrupt_desc(head, flags=INDIRECT | NEXT, next=1)
    expect_rule(q, mem, "indirect_next", f"descriptor {head}")


def test_rule_write_before_read(impl: Any) -> None:
    mem, drv, q = setup(impl)
    head = drv.add([b"a", b"b"])
    drv.corrupt_desc(head, flags=NEXT | WRITE)
    expect_rule(q, mem, "write_before_read", f"chain {head}", "descriptor")
    mem, drv, q = setup(impl)
    drv.add([b"a"], [4, 4], indirect=True)
    addr = drv.read_desc(0)[0]
    drv.write(addr + 16 * 2 + 12, b"\x00\x00")  # last entry becomes device-readable
    expect_rule(q, mem, "write_before_read", "indirect descriptor 2")


def test_rule_zero_len(impl: Any) -> None:
    mem, drv, q = setup(impl)
    head = drv.add([b"a"], [4])
    drv.corrupt_desc(drv.read_desc(head)[3], length=0)
    expect_rule(q, mem, "zero_len", "descriptor 1: length 0")


def test_rule_chain_len(impl: Any) -> None:
    mem = GuestMemory()
    mem.add(Region(BASE, MEM_SIZE, bytearray(MEM_SIZE)))
    _fd, big = memfd_region(1 << 32, 1 << 31)  # sparse: never touched
    os.close(_fd)
    mem.add(big)
    drv = DriverQueue(mem, 8)
    q = drv.queue(impl)
    drv.write_desc(0, big.gpa, 0x80000000, NEXT, 1)
    drv.write_desc(1, big.gpa, 0x7FFFFFFF, 0, 0)  # 2^32 - 1 in total: still fine
    drv.make_available(0)
    assert q.pop(mem) == [(0, [(big.gpa, 0x80000000), (big.gpa, 0x7FFFFFFF)], [])]
    drv.write_desc(1, big.gpa, 0x80000000, WRITE, 0)
    drv.make_available(0)
    expect_rule(q, mem, "chain_len", "4294967296")
    mem.close()


def test_rule_broken(impl: Any) -> None:
    mem, drv, q = setup(impl)
    drv.set_avail_idx(1000)
    with pytest.raises(RingError):
        q.pop(mem)
    calls = [
        lambda: q.pop(mem), lambda: q.push(mem, [(0, 0)]), lambda: q.pending(mem),
        lambda: q.should_notify(mem), lambda: q.set_notification(mem, True),
    ]  # fmt: skip
    for call in calls:
        with pytest.raises(RingError) as info:
            call()
        assert info.value.rule == "broken" and "avail idx 1000" in str(info.value)


# ---- guest memory bounds ----


@pytest.mark.parametrize("ring", ["desc", "avail", "used"])
def test_ring_outside_carve_out(impl: Any, ring: str) -> None:
    mem, drv, _ = setup(impl)
    addrs = {"desc": drv.desc, "avail": drv.avail, "used": drv.used}
    addrs[ring] = BASE + MEM_SIZE - 16  # starts inside, ends outside
    q = impl(8, addrs["desc"], addrs["avail"], addrs["used"])
    with pytest.raises(GuestMemoryError) as info:
        q.pending(mem)
    text = str(info.value)
    assert f"{ring} " in text and hex(BASE + MEM_SIZE - 16) in text
    assert f"[{BASE:#x}, {BASE + MEM_SIZE:#x})" in text and q.broken == text
    with pytest.raises(RingError, match="broken"):
        q.push(mem, [])


def test_nothing_mapped(impl: Any) -> None:
    q = impl(8, 0, 0x80, 0x100)
    with pytest.raises(GuestMemoryError, match=r"nothing mapped"):
        q.pop(GuestMemory())


@pytest.mark.parametrize(
    ("addr", "length"),
    [
        (BASE + MEM_SIZE - 4, 8),  # runs off the end
        (BASE - 1, 2),  # starts before
        (BASE + MEM_SIZE - 1, 2),  # straddles two adjacent regions: one window per buffer
        (BASE + MEM_SIZE + 0xFF, 2),  # runs off the adjacent region
        ((1 << 64) - 4, 16),  # gpa + len wraps around 2^64
        ((1 << 64) - 0x1000 + 0x800, 0x900),  # top region, wraps
    ],
)
def test_buffer_outside_carve_out(impl: Any, addr: int, length: int) -> None:
    mem, drv, q = setup(impl)
    mem.add(Region(BASE + MEM_SIZE, 0x100, bytearray(0x100)))
    mem.add(Region((1 << 64) - 0x1001, 0x1000, bytearray(0x1000)))
    drv.write_desc(0, addr, length, 0, 0)
    drv.make_available(0)
    with pytest.raises(GuestMemoryError) as info:
        q.pop(mem)
    assert f"[{addr:#x}, +{length:#x})" in str(info.value) and "buffer" in str(info.value)
    assert q.broken is not None


def test_indirect_table_outside_carve_out(impl: Any) -> None:
    mem, drv, q = setup(impl)
    drv.write_desc(0, BASE + MEM_SIZE - 16, 32, INDIRECT)
    drv.make_available(0)
    with pytest.raises(GuestMemoryError, match="indirect table"):
        q.pop(mem)


# ---- differential property tests: C and Python must agree on everything ----

A, A_LEN = 0x10000, 2048  # rings and data
B, B_LEN = A + A_LEN, 256  # an adjacent window
TOP, TOP_LEN = (1 << 64) - 0x1001, 0x1000  # the top of the address space
IND = (A + 1024, A + 1536)  # where structured indirect tables go (8 entries each)
BIG_GPA, BIG_LEN = 1 << 32, 1 << 32  # sparse and shared: ring code never writes buffers

_big: list[Region] = []


def big_region() -> Region:
    if not _big:
        fd, region = memfd_region(BIG_GPA, BIG_LEN)
        os.close(fd)
        _big.append(region)
    return _big[0]


EDGE_ADDRS = [A, A + A_LEN - 1, A + A_LEN, B, B + B_LEN - 1, B + B_LEN, TOP, TOP + TOP_LEN - 1,
              (1 << 64) - 1, (1 << 64) - 16, BIG_GPA, BIG_GPA + BIG_LEN - 1, 0, *IND]  # fmt: skip
EDGE_LENS = [0, 16, 32, 128, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 16 * 65535, 16 * 65536]


def rand_desc(rng: random.Random, size: int) -> tuple[int, int, int, int]:
    """A plausible descriptor half of the time (so chains get deep), else indirect or hostile."""
    flags = rng.choice([0, NEXT, WRITE, NEXT | WRITE, rng.randrange(8), rng.randrange(1 << 16)])
    nxt = rng.choice([rng.randrange(size), rng.randrange(size + 2), rng.randrange(1 << 16)])
    kind = rng.random()
    if kind < 0.5:
        length = rng.randrange(1, 49) if rng.random() < 0.97 else 0
        return rng.randrange(A + 1024, A + A_LEN - 64), length, flags, nxt
    if kind < 0.7:
        ind_flags = rng.choice([INDIRECT, INDIRECT, INDIRECT | WRITE, INDIRECT | NEXT])
        return rng.choice(IND), rng.choice([0, 8, 16, 32, 64, 128]), ind_flags, nxt
    if kind < 0.8:  # a huge buffer: chains may add up to 2^32
        return BIG_GPA + rng.randrange(64), rng.choice([0x80000000, 0xFFFFFFF0]), flags, nxt
    addr = rng.choice([rng.randrange(A, A + A_LEN), rng.choice(EDGE_ADDRS), rng.getrandbits(64)])
    length = rng.choice([rng.randrange(49), rng.choice(EDGE_LENS), rng.getrandbits(32)])
    return addr, length, flags, nxt


POP = st.one_of(st.tuples(st.just("pop"), st.integers(0, 3)),
                st.tuples(st.just("pop_batch"), st.integers(0, 3)))  # fmt: skip
OPS = st.one_of(
    POP,
    POP,
    # push_batch: a buffer of (head, len) entries, heads taken modulo the queue size;
    # push_batch_raw: any bytes (bad lengths, heads out of range)
    st.tuples(st.just("push_batch"), st.lists(st.tuples(st.integers(0, 15), st.integers(0, 9)))),
    st.tuples(st.just("push_batch_raw"), st.binary(max_size=36)),
    # push: heads are taken modulo the queue size; push_raw may also pass invalid ones
    st.tuples(st.just("push"), st.lists(st.tuples(st.integers(0, 15), st.integers(0, 9)))),
    st.tuples(
        st.just("push_raw"),
        st.lists(st.tuples(st.integers(0, 17), st.integers(0, 1 << 32)), max_size=4),
    ),
    st.tuples(st.just("should_notify")),
    st.tuples(st.just("should_notify")),
    st.tuples(st.just("set_notification"), st.booleans()),
    st.tuples(st.just("pending")),
    st.tuples(st.just("last_avail_idx"), st.integers(0, 0xFFFF)),
    st.tuples(st.just("used_idx"), st.integers(0, 0xFFFF)),
    st.tuples(st.just("event_idx"), st.booleans()),
    st.tuples(st.just("guest"), st.integers(0, A_LEN - 1), st.binary(min_size=1, max_size=4)),
)


@st.composite
def scenarios(draw: st.DrawFn, structured: bool) -> dict[str, Any]:
    """Random bytes everywhere; ``structured`` then writes plausible or hostile descriptors,
    avail idx and heads over them. Hypothesis draws the knobs and a seed for the bulk."""
    return make_scenario(
        draw(st.integers(0, 2**32)), structured, draw(st.sampled_from([1, 2, 4, 8, 16])),
        draw(st.integers(0, 3)) == 0, [draw(POP), *draw(st.lists(OPS, max_size=8))],
    )  # fmt: skip


def make_scenario(
    seed: int, structured: bool, size: int, anywhere: bool, ops: list[Any]
) -> dict[str, Any]:
    rng = random.Random(seed)
    a = bytearray(rng.randbytes(A_LEN) if seed % 4 else bytes(A_LEN))
    desc, avail, used = A, A + 16 * size, A + (16 * size + 6 + 2 * size + 3) // 4 * 4
    if anywhere:  # rings anywhere: overlapping each other, partly or wholly unmapped
        desc = rng.choice([A, A + 16 * rng.randrange(131), B, TOP - 1, 0]) & ~15
        avail = A + 2 * rng.randrange(A_LEN // 2 + 8)
        used = A + 4 * rng.randrange(A_LEN // 4 + 4)
    if structured and A <= desc and desc + 16 * size <= A + A_LEN:
        for i in range(size):
            off = desc - A + 16 * i
            a[off : off + 16] = DESC.pack(*rand_desc(rng, size))
    if structured:
        for k in range(16):  # two indirect tables of 8 entries
            off = IND[k // 8] - A + 16 * (k % 8)
            a[off : off + 16] = DESC.pack(*rand_desc(rng, 8))
    last, used_idx = rng.randrange(1 << 16), rng.randrange(1 << 16)
    if A <= avail and avail + 6 + 2 * size <= A + A_LEN:
        off = avail - A
        if structured:  # used_event near used_idx, so should_notify() has decisions to make
            event = (used_idx + rng.randrange(-1, 4)) & 0xFFFF
            a[off + 4 + 2 * size : off + 6 + 2 * size] = event.to_bytes(2, "little")
        ahead = rng.choice([rng.randrange(1, size + 1)] * 17 + [size + 1, rng.randrange(1 << 16)])
        last = (int.from_bytes(a[off + 2 : off + 4], "little") - ahead) & 0xFFFF
        for k in range(size if structured else 0):
            head = rng.choice([rng.randrange(size)] * 23 + [size, rng.randrange(1 << 16)])
            a[off + 4 + 2 * k : off + 6 + 2 * k] = head.to_bytes(2, "little")
    return {
        "size": size, "rings": (desc, avail, used), "a": bytes(a), "last": last,
        "used_idx": used_idx, "event_idx": rng.random() < 0.5,
        "b": rng.randbytes(B_LEN), "ops": ops,
    }  # fmt: skip


def run_op(q: Any, mem: GuestMemory, op: tuple[Any, ...]) -> tuple[Any, ...]:
    name, *args = op
    try:
        if name == "guest":
            buf = mem.regions[0].buf  # region A: the guest rewrites its rings meanwhile
            end = min(args[0] + len(args[1]), A_LEN)
            buf[args[0] : end] = args[1][: end - args[0]]
            return ("ok",)
        if name in ("last_avail_idx", "used_idx", "event_idx"):
            setattr(q, name, args[0])
            return ("ok",)
        if name in ("push", "push_batch"):
            args = [[(h & (q.size - 1), n) for h, n in args[0][: q.size]]]
        if name == "push_batch":
            args = [b"".join(USED_ELEM.pack(*e) for e in args[0])]
        return ("ok", getattr(q, name.removesuffix("_raw"))(mem, *args))
    except (RingError, GuestMemoryError) as exc:
        return ("error", type(exc).__name__, getattr(exc, "rule", None), str(exc))
    except (ValueError, TypeError, OverflowError) as exc:
        return ("error", type(exc).__name__)


def differential(sc: dict[str, Any]) -> None:
    runs = []
    for cls in (IMPLEMENTATIONS["c"], IMPLEMENTATIONS["python"]):
        mine = [Region(A, A_LEN, bytearray(sc["a"])), Region(B, B_LEN, bytearray(sc["b"])),
                Region(TOP, TOP_LEN, bytearray(TOP_LEN))]  # fmt: skip
        mem = GuestMemory()
        for region in [*mine, big_region()]:
            mem.add(region)
        q = cls(sc["size"], *sc["rings"], event_idx=sc["event_idx"])
        q.last_avail_idx, q.used_idx = sc["last"], sc["used_idx"]
        trace = []
        for op in sc["ops"]:
            trace.append(run_op(q, mem, op))
            state = (q.last_avail_idx, q.used_idx, q.event_idx, q.broken)
            trace.append((state, [bytes(r.buf) for r in mine]))
        runs.append(trace)
    assert runs[0] == runs[1]


needs_both = pytest.mark.skipif("c" not in IMPLEMENTATIONS, reason="C extension not built")
FAST = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@needs_both
@FAST
@given(scenarios(structured=False))
def test_differential_random_bytes(sc: dict[str, Any]) -> None:
    differential(sc)


@needs_both
@FAST
@given(scenarios(structured=True))
def test_differential_structured(sc: dict[str, Any]) -> None:
    differential(sc)


@needs_both
def test_differential_reaches_deep_rules() -> None:
    """The structured generator does reach chains and every deep rule, not just idx checks."""
    seen = set()
    for seed in range(1500):
        sc = make_scenario(seed, True, 1 << seed % 5, seed % 7 == 0, [])
        mem = GuestMemory()
        mem.add(Region(A, A_LEN, bytearray(sc["a"])))
        mem.add(Region(B, B_LEN, bytearray(sc["b"])))
        mem.add(big_region())
        q = IMPLEMENTATIONS["c"](sc["size"], *sc["rings"])
        q.last_avail_idx = sc["last"]
        out = run_op(q, mem, ("pop", 0))
        seen.add(out[2] or out[1] if out[0] == "error" else ("chains" if out[1] else "empty"))
    rules = {"next", "loop", "chain_len", "zero_len", "write_before_read", "indirect_len",
             "indirect_next", "indirect_nested", "head", "avail_idx", "GuestMemoryError",
             "chains"}  # fmt: skip
    assert rules <= seen, rules - seen
