"""What the in-process device fuzzers share (``fuzz_devices.py``, ``fuzz_peripherals.py``):
one input becomes a device kind, guest memory and the control bytes that write chains.

The input's head is the control bytes, its tail the guest memory (a 64 KiB carve-out at
``GPA``), so the headers a device reads from memory are the fuzzer's choice. Chains point
mostly into the memory's first bytes (where the input's own bytes land), sometimes
anywhere in it, sometimes outside it altogether.
"""

from __future__ import annotations

from collections.abc import Callable

import atheris

from edgevirt.backend.devices.base import Chain
from edgevirt.backend.devices.fakehost import FakeHost
from edgevirt.backend.memory import GuestMemory, Region

GPA = 0x5C000000
MEM = 1 << 16


def start(data: bytes, kinds: int) -> tuple[int, atheris.FuzzedDataProvider, FakeHost]:
    """The device kind (0 .. kinds - 1), the control bytes' provider, and a fake transport
    over the guest memory."""
    fdp = atheris.FuzzedDataProvider(data)
    kind = fdp.ConsumeIntInRange(0, kinds - 1)
    split = fdp.ConsumeIntInRange(0, max(0, fdp.remaining_bytes() - 1))
    control = fdp.ConsumeBytes(split)
    memory = bytearray(fdp.ConsumeBytes(MEM).ljust(MEM, b"\0"))
    mem = GuestMemory([Region(GPA, MEM, memory)])
    return kind, atheris.FuzzedDataProvider(control), FakeHost(mem)


def chain_from(
    fdp: atheris.FuzzedDataProvider,
    head: int,
    near: int,
    size: Callable[[atheris.FuzzedDataProvider], int],
) -> Chain:
    """1 to 4 segments, mostly within the memory (offset up to ``near`` more often than
    not), split anywhere between driver-readable and device-writable; ``size`` draws each
    segment's length."""
    segs: list[tuple[int, int]] = []
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        inside = fdp.ConsumeBool() or fdp.ConsumeBool()
        off = fdp.ConsumeIntInRange(0, near) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, MEM)
        gpa = GPA + off if inside else fdp.ConsumeIntInRange(0, 1 << 40)
        segs.append((gpa, size(fdp)))
    split = fdp.ConsumeIntInRange(0, len(segs))
    return Chain(head, segs[:split], segs[split:])
