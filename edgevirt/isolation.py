"""The isolation proof: what the service side can read of the front-end's memory.

The front-end writes one random secret into its private RAM (a tmpfs file) and another into
the carve-out; the scanner module ``ev_scan`` in the service VM or domain reads every byte
it can map (its System RAM, every Xen ``/passthrough`` region, every ivshmem BAR) and counts
both. The carve-out's secret must be found in a shared region, the private one never.

How the carve-out secret gets there is the platform's: on Xen the front-end's carve-out is
device memory (``xen,reg``), so ``devmem`` writes it; on the QEMU service-VM platform it is
System RAM of the front-end (CONFIG_STRICT_DEVMEM refuses ``devmem``), so the secret takes the
path every guest buffer takes: a block written to the virtio disk is bounced through the
restricted DMA pool, and swiotlb leaves the bounce slot's bytes in place after the write.

Both patterns are written to the scanner inverted (each byte XOR 0xff), so the service side
never holds them itself.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgevirt.console.expect import Console
from edgevirt.paths import images_dir
from edgevirt.smoke import Check

SECRET_BYTES = 64
_RAM = re.compile(r"ram pages=(\d+) skipped=(\d+) hits=(\d+),(\d+)")
_SHARED = re.compile(r"^(passthrough|ivshmem) (\S+) (0x[0-9a-f]+)-(0x[0-9a-f]+) hits=(\d+),(\d+)",
                     re.M)  # fmt: skip

#: Writes the shared secret into the carve-out from the front-end's console; returns where
#: it went (for the check's detail) and a shell command that wipes it again.
Plant = Callable[[Console, bytes], tuple[str, str]]


def scanner_module() -> Path:
    """The ``ev_scan`` source directory (built like any service-side module)."""
    return images_dir() / "servicevm" / "modules" / "ev_scan"


@dataclass(frozen=True)
class Scan:
    pages: int
    unmapped: int
    ram_hits: tuple[int, int]  # (private, shared)
    regions: list[tuple[str, str, int, int, tuple[int, int]]]  # kind, name, start, end, hits


def parse_scan(out: str) -> Scan | None:
    """``cat /proc/ev-scan`` output, or None when it has no RAM line or no shared region."""
    ram = _RAM.search(out)
    regions = [(k, n, int(a, 16), int(b, 16), (int(h0), int(h1)))
               for k, n, a, b, h0, h1 in _SHARED.findall(out)]  # fmt: skip
    if ram is None or not regions:
        return None
    return Scan(int(ram.group(1)), int(ram.group(2)), (int(ram.group(3)), int(ram.group(4))),
                regions)  # fmt: skip


def devmem_plant(at: int) -> Plant:
    """The carve-out is device memory in the front-end (Xen): 8 bytes at a time at ``at``."""

    def plant(fe: Console, shared: bytes) -> tuple[str, str]:
        words = [int.from_bytes(shared[i : i + 8], "little") for i in range(0, len(shared), 8)]
        cmd = "; ".join(f"devmem {at + 8 * i:#x} 64 {w:#x}" for i, w in enumerate(words))
        fe.run(cmd, 30)
        wipe = "; ".join(f"devmem {at + 8 * i:#x} 64 0" for i in range(len(words)))
        return f"guest {at:#x}", wipe

    return plant


def bounce_plant(disk: str, offset: int) -> Plant:
    """The carve-out is the front-end's restricted DMA pool: the secret is written to the
    virtio disk at ``offset`` (synchronously), so it passes through a bounce slot."""

    def plant(fe: Console, shared: bytes) -> tuple[str, str]:
        esc = "".join(f"\\{b:03o}" for b in shared)
        fe.run(f"printf '{esc}' > /tmp/shared-secret; dd if=/tmp/shared-secret of={disk} "
               f"bs={len(shared)} seek={offset // len(shared)} conv=fsync 2>/dev/null; "
               "rm -f /tmp/shared-secret", 30)  # fmt: skip
        return f"a {len(shared)}-byte write to {disk} at {offset:#x} (bounce buffer)", ""

    return plant


def isolation_check(fe: Console, svc: Console, plant: Plant, side: str) -> list[Check]:
    """Plant both secrets, scan on ``svc``; ``side`` names the scanning side in the checks
    ("service domain", "service VM")."""
    private = secrets.token_bytes(SECRET_BYTES)
    shared = secrets.token_bytes(SECRET_BYTES)
    esc = "".join(f"\\{b:03o}" for b in private)
    r = fe.run(f"printf '{esc}' > /tmp/private-secret; od -An -tx1 /tmp/private-secret "
               "| tr -d ' \\n'", 30)  # fmt: skip
    if r.output.strip() != private.hex():
        return [Check("isolation: secrets written", False, f"front-end wrote {r.output[:80]!r}")]
    where, wipe = plant(fe, shared)
    try:
        inverted = " ".join(bytes(b ^ 0xFF for b in x).hex() for x in (private, shared))
        svc.run(f"echo {inverted} > /proc/ev-scan", 20)
        out = svc.run("cat /proc/ev-scan", 180).output
    finally:
        fe.run("rm -f /tmp/private-secret" + (f"; {wipe}" if wipe else ""), 30)
    scan = parse_scan(out)
    if scan is None:
        return [Check("isolation: scan", False, f"scanner output: {out[-300:]!r}")]
    priv_hits = scan.ram_hits[0] + sum(h[0] for *_x, h in scan.regions)
    shared_hits = sum(h[1] for *_x, h in scan.regions)
    regions = ", ".join(f"{k} [{a:#x}, {b:#x})" for k, _n, a, b, _h in scan.regions)
    ok = priv_hits == 0 and scan.pages > 0
    return [
        Check("isolation: front-end's private secret", ok,
              f"0 of {SECRET_BYTES} B found: {side} scanned {scan.pages} RAM pages "
              f"({scan.pages * 4 >> 10} MiB, {scan.unmapped} unmapped) and the shared "
              f"regions {regions}" if priv_hits == 0 else
              f"FOUND {priv_hits} times in the {side}"),
        Check("isolation: carve-out secret", shared_hits >= 1,
              f"found {shared_hits}x in the shared regions after {where} "
              f"(RAM hits {scan.ram_hits[1]})"),
    ]  # fmt: skip
