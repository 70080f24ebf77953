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

#: Puts the secret file ``SHARED_FILE`` (already written by the front-end) into the
#: carve-out from the front-end's console; returns where it went (for the check's detail)
#: and a shell command that wipes it again ("" when nothing needs wiping).
Plant = Callable[[Console], tuple[str, str]]
PRIVATE_FILE, SHARED_FILE = "/tmp/private-secret", "/tmp/shared-secret"


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
    """The carve-out is device memory in the front-end (Xen): 8 bytes at a time at ``at``
    (``od -tx8`` prints little-endian words as devmem writes them)."""
    loop = f"i=0; for w in $(od -An -v -tx8 {SHARED_FILE}); do devmem $(({at:#x}+i)) 64 "

    def plant(fe: Console) -> tuple[str, str]:
        fe.run(loop + "0x$w; i=$((i+8)); done", 30)
        return f"guest {at:#x}", loop + "0; i=$((i+8)); done"

    return plant


def bounce_plant(disk: str, offset: int) -> Plant:
    """The carve-out is the front-end's restricted DMA pool: the secret is written to the
    virtio disk at ``offset`` (synchronously), so it passes through a bounce slot."""

    def plant(fe: Console) -> tuple[str, str]:
        fe.run(f"dd if={SHARED_FILE} of={disk} bs={SECRET_BYTES} "
               f"seek={offset // SECRET_BYTES} conv=fsync 2>/dev/null", 30)  # fmt: skip
        return f"a {SECRET_BYTES}-byte write to {disk} at {offset:#x} (bounce buffer)", ""

    return plant


def _guest_secret(fe: Console, path: str) -> bytes | None:
    """A random secret the front-end makes itself (only its hex crosses its console, which
    the service side never sees; typing it in would take seconds per command on Xen's
    32-character input FIFO)."""
    r = fe.run(f"head -c {SECRET_BYTES} /dev/urandom > {path}; od -An -v -tx1 {path} "
               "| tr -d ' \\n'", 30)  # fmt: skip
    text = r.output.strip()
    ok = r.status == 0 and len(text) == 2 * SECRET_BYTES
    return bytes.fromhex(text) if ok and all(c in "0123456789abcdef" for c in text) else None


def isolation_check(fe: Console, svc: Console, plant: Plant, side: str) -> list[Check]:
    """Plant both secrets, scan on ``svc``; ``side`` names the scanning side in the checks
    ("service domain", "service VM")."""
    private = _guest_secret(fe, PRIVATE_FILE)
    shared = _guest_secret(fe, SHARED_FILE)
    if private is None or shared is None or private == shared:
        fe.run(f"rm -f {PRIVATE_FILE} {SHARED_FILE}", 30)
        return [Check("isolation: secrets written", False, "the front-end could not make two "
                      "random 64-byte secrets (head -c / od)")]  # fmt: skip
    where, wipe = plant(fe)
    try:
        inverted = " ".join(bytes(b ^ 0xFF for b in x).hex() for x in (private, shared))
        svc.run(f"echo {inverted} > /proc/ev-scan", 20)
        out = svc.run("cat /proc/ev-scan", 180).output
    finally:
        fe.run(f"rm -f {PRIVATE_FILE} {SHARED_FILE}" + (f"; {wipe}" if wipe else ""), 30)
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
