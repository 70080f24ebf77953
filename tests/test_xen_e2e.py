"""Xen 4.17 dom0less end to end (Debian's hypervisor under QEMU, EL2): `edgevirt up
--platform xen` boots the front-end and service domUs from edgevirt's own host DTB, runs the
smoke suite over virtio-msg (passthrough message memory, static event channel doorbells,
DMA confined to the passthrough carve-out), proves the isolation the hypervisor enforces
(the service domain finds the carve-out secret and never the front-end's private one; a
stray access of its own faults while everything keeps running), and checks the service
domain's back-end counters and disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgevirt.platforms.xen_dom0less import up_xen
from edgevirt.up import UpOptions

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def _need_qemu() -> None:
    if not shutil.which("qemu-system-aarch64"):
        pytest.skip("qemu-system-aarch64 not installed")


def test_xen_dom0less_up_passes_with_isolation_proven(tmp_path: Path) -> None:
    r = up_xen(UpOptions(tmp_path, boot_timeout=300))
    checks = {c.name: c for c in r.checks}
    assert r.error is None, r.error
    failed = {n: c.detail for n, c in checks.items() if not c.ok}
    assert not failed, failed
    for name in ("front-end: virtio features", "front-end: carve-out DMA",
                 "front-end: blk write/read-back", "front-end: hwrng",
                 "front-end: virtio-msg bus", "isolation: front-end's private secret",
                 "isolation: carve-out secret", "isolation: access outside the mappings",
                 "service domU: event channel doorbells", "service domU: back-end blk (dev 0)",
                 "service domU: its disk holds the front-end's data",
                 "Xen: both domUs powered off"):  # fmt: skip
        assert name in checks, sorted(checks)
    assert "0 of 64 B found" in checks["isolation: front-end's private secret"].detail
    assert "stopped by SIG" in checks["isolation: access outside the mappings"].detail
    assert "over Xen static event channel 10" in checks["front-end: virtio-msg bus"].detail
    # The raw Xen UART and each domain's demultiplexed console are kept.
    for log in ("xen-console.log", "frontend-console.log", "service-console.log"):
        assert (tmp_path / log).stat().st_size > 0
    assert "(XEN) DOM2:" in (tmp_path / "xen-console.log").read_text(errors="replace")
    assert r.ok


def test_uboot_boot_script_boots_the_same_system(tmp_path: Path) -> None:
    """The real-board path: u-boot-qemu at EL2 fetches edgevirt's boot script over TFTP,
    which loads Xen, the host DTB and every domU module; both domUs come up and the
    front-end's rings lie in the carve-out, its devices served by the service domain."""
    from edgevirt.platforms.xen_machine import XenMachine
    from edgevirt.report import Reporter

    m = XenMachine(tmp_path, boot_via="uboot")
    m.prepare(Reporter())
    try:
        consoles = m.boot(Reporter(), 300)
        dma = consoles["frontend"].run("cat /proc/edgevirt-dma", 60).output
        rng = consoles["frontend"].run("dd if=/dev/hwrng bs=32 count=1 2>/dev/null | wc -c", 60)
    finally:
        m.stop()
    raw = (tmp_path / "xen-console.log").read_text(errors="replace")
    assert "## Executing script at 40200000" in raw or "Executing script" in raw
    assert "Starting kernel" in raw and "Xen version 4.17" in raw
    assert dma.count("pool=carveout-ops start=0x3c000000") == 2, dma
    assert "in_pool=0" not in dma
    assert rng.output.strip() == "32"


def _processes_naming(path: Path) -> list[str]:
    """Processes whose command line names ``path`` (QEMU, its helpers)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(path).encode() in cmdline:
            found.append(f"{pid}: {cmdline[:120]!r}")
    return found


def test_backend_crash_fails_fast_and_blames_the_service_domain(tmp_path: Path) -> None:
    """`up --platform xen --fault backend-crash` through the CLI: the back-end is killed in
    the service domU after both shells; the front-end's I/O fails (virtio-msg declares the
    device side gone) instead of hanging, the report blames the service VM, exit code 1,
    and no QEMU is left behind."""
    build = tmp_path / "xen"
    t = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "edgevirt", "up", "--platform", "xen", "--fault", "backend-crash",
         "--boot-timeout", "300", "--build-dir", str(build), "--json"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    seconds = time.monotonic() - t
    assert run.returncode == 1, (run.returncode, run.stderr[-2000:])
    r = json.loads(run.stdout)
    checks = {c["name"]: c for c in r["checks"]}
    assert r["ok"] is False and r["failed_vm"] == "service", (r["failed_vm"], r["error"])
    assert r["fault"] == "backend-crash"
    # the suite ran to its end: no step hung until its timeout and broke the console
    assert r["error"] is None, r["error"]
    assert r["timings"]["frontend_suite"] < 60, r["timings"]
    # the front-end saw the dead device side and says so
    assert not checks["front-end: blk write/read-back"]["ok"]
    hwrng = checks["front-end: hwrng"]
    assert not hwrng["ok"] and "no entropy within 15 s" in hwrng["detail"], hwrng
    module = checks["front-end: virtio-msg module"]
    assert not module["ok"] and "device side" in module["detail"], module
    backend = checks["service domU: back-end process"]
    assert not backend["ok"] and "not running" in backend["detail"], backend
    # the checks that need no back-end still pass: the failure is not blamed on the bus
    assert checks["front-end: virtio features"]["ok"]
    assert checks["front-end: carve-out DMA"]["ok"]
    assert checks["Xen: both domUs powered off"]["ok"]
    assert _processes_naming(build) == []
    print(f"backend-crash run: {seconds:.1f}s, suite {r['timings']['frontend_suite']:.1f}s")
