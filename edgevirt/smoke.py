"""The smoke suite `edgevirt up` runs over the serial console.

Each check is a guest command plus a judgement of its output; the host-side checks (disk
image contents, back-end counters) are in :mod:`edgevirt.up`. Checks are data so the
summary can list them and later suites can reuse the runner.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from edgevirt.console.expect import CommandResult

VIRTIO_ID_BLOCK = 2
VIRTIO_ID_RNG = 4
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33
DISK_TEST_BYTES = 8 << 20


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class GuestCheck:
    name: str
    command: str
    judge: Callable[[CommandResult], tuple[bool, str]]
    timeout: float = 60.0


def _features(res: CommandResult) -> tuple[bool, str]:
    """Lines ``<device id> <feature bit string>`` from sysfs; bit i is character i."""
    found: dict[int, str] = {}
    for line in res.output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].startswith("0x"):
            found[int(parts[0], 16)] = parts[1]
    bad = []
    for dev in (VIRTIO_ID_BLOCK, VIRTIO_ID_RNG):
        bits = found.get(dev)
        if bits is None:
            bad.append(f"device id {dev} not present")
            continue
        for b in (F_VERSION_1, F_ACCESS_PLATFORM):
            if len(bits) <= b or bits[b] != "1":
                bad.append(f"device id {dev} lacks feature bit {b}")
    if bad:
        return False, "; ".join(bad)
    return True, "blk and rng negotiated VERSION_1 (32) and ACCESS_PLATFORM (33)"


def pool_judge(
    base: int, size: int, nodes: list[str]
) -> Callable[[CommandResult], tuple[bool, str]]:
    """The kernel must create the pool exactly over the carve-out and give it to ``nodes``."""
    wanted = sorted(n.rsplit("@", 1)[-1] for n in nodes)

    def judge(res: CommandResult) -> tuple[bool, str]:
        created = re.search(
            r"created restricted DMA pool at (0x[0-9a-f]+), size (\d+) MiB", res.output
        )
        assigned = sorted(
            re.findall(
                r"virtio-mmio ([0-9a-f]+)\.virtio_mmio: assigned reserved memory node", res.output
            )
        )
        if not created:
            return False, "kernel did not log 'created restricted DMA pool'"
        at, mib = int(created.group(1), 16), int(created.group(2))
        if (at, mib << 20) != (base, size):
            return False, (
                f"pool at {at:#x} ({mib} MiB), expected the carve-out {base:#x} ({size >> 20} MiB)"
            )
        if assigned != wanted:
            return False, f"pool assigned to {assigned or 'no device'}, expected {wanted}"
        return True, f"pool at {at:#x} ({mib} MiB) assigned to " + ", ".join(assigned)

    return judge


def _disk(res: CommandResult) -> tuple[bool, str]:
    m = re.findall(r"^([0-9a-f]{64})\b", res.output, re.M)
    if res.status != 0 or len(m) != 2:
        return False, f"exit {res.status}: {res.output[-300:]}"
    if m[0] != m[1]:
        return False, f"written {m[0][:16]}… but read back {m[1][:16]}…"
    return True, f"8 MiB written and read back, sha256 {m[0][:16]}…"


def _rng(res: CommandResult) -> tuple[bool, str]:
    lines = res.output.split()
    if res.status != 0 or not lines or not lines[-1].isdigit():
        return False, f"exit {res.status}: {res.output[-300:]}"
    distinct = int(lines[-1])
    if distinct < 2:
        return False, "4 KiB from /dev/hwrng are all one byte value"
    return True, f"4 KiB from /dev/hwrng with {distinct} distinct byte values"


def guest_checks(carveout_base: int, carveout_size: int, nodes: list[str]) -> list[GuestCheck]:
    """The smoke suite for a guest whose ``nodes`` should use the carve-out."""
    return [
        GuestCheck(
            "virtio features",
            "for d in /sys/bus/virtio/devices/*; do echo $(cat $d/device) $(cat $d/features); done",
            _features,
        ),
        GuestCheck(
            "restricted DMA pool",
            "dmesg | grep -E 'restricted DMA pool|reserved memory'",
            pool_judge(carveout_base, carveout_size, nodes),
        ),
        GuestCheck(
            "blk write/read-back",
            # Write random data, drop the page cache of /dev/vda, read it back from the device.
            "dd if=/dev/urandom of=/tmp/w bs=1M count=8 2>/dev/null && sha256sum /tmp/w"
            " && dd if=/tmp/w of=/dev/vda bs=1M conv=fsync 2>/dev/null"
            " && blockdev --flushbufs /dev/vda"
            " && dd if=/dev/vda bs=1M count=8 2>/dev/null | sha256sum",
            _disk,
            timeout=120.0,
        ),
        GuestCheck(
            "hwrng",
            "cat /sys/class/misc/hw_random/rng_current >&2;"
            " dd if=/dev/hwrng bs=4096 count=1 iflag=fullblock 2>/dev/null"
            " | od -An -v -tx1 | tr -s ' ' '\\n' | grep . | sort -u | wc -l",
            _rng,
        ),
    ]
