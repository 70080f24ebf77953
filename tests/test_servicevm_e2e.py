"""Two VMs end to end: the back-end runs inside an aarch64 service VM (Debian's arm64
Python 3.11, edgevirt with its cross-compiled C ring), linked to the front-end VM only by
the host's shared-memory files and ivshmem doorbells. The same smoke suite passes on the
front-end; the service VM's health is checked on its own console; faults in the service VM
turn into a clear module timeout on the front-end and a report that names the service VM.

The service VM is killed under a running front-end and restarted (fault service-restart):
in-flight I/O fails with an error (no hang) and the log names the device; the new back-end
bumps the epoch, the front-end's module resets and re-probes its devices without a reboot,
a second write/read-back round passes and the first round's data is still on the disk."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from edgevirt.servicevm.up import up_service_vm

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def _need_qemu() -> None:
    if not shutil.which("qemu-system-aarch64"):
        pytest.skip("qemu-system-aarch64 not installed")


def _shm() -> set[str]:
    """This process's shared-memory files (the tag starts with our pid: other runs on the
    machine come and go)."""
    mine = f"-{os.getpid()}-"
    return {n for n in os.listdir("/dev/shm") if n.startswith("edgevirt-svm-") and mine in n}


def _names(result: object) -> dict[str, bool]:
    return {c.name: c.ok for c in result.checks}  # type: ignore[attr-defined]


def test_two_vms_pass_the_smoke_suite(tmp_path: Path) -> None:
    before = _shm()
    r = up_service_vm(tmp_path)
    failed = [(c.name, c.detail) for c in r.checks if not c.ok]
    assert r.ok, (r.error, failed)
    assert r.failed_vm is None
    checks = _names(r)
    for name in ("front-end: blk write/read-back", "front-end: hwrng",
                 "service VM: MSI-X interrupts", "service VM: back-end blk (dev 0)",
                 "host: service VM's disk image", "isolation: front-end's private secret",
                 "isolation: carve-out secret"):  # fmt: skip
        assert checks.get(name), name
    # the isolation proof, as on Xen: the scanner read the service VM's RAM and both ivshmem
    # BARs (carve-out and message memory); only the carve-out's secret was there
    detail = {c.name: c.detail for c in r.checks}
    assert "0 of 64 B found" in detail["isolation: front-end's private secret"]
    assert detail["isolation: front-end's private secret"].count("ivshmem [") == 2
    assert "bounce buffer" in detail["isolation: carve-out secret"]
    # the back-end really ran in the service VM with the aarch64 C ring, over MSI-X
    assert r.backend["ring"] == "edgevirt.backend.virtq._ring"
    assert r.backend["link"]["mode"] == "msi-x"
    assert r.image["extension"]["machine"] == "EM_AARCH64"
    assert "python3.11-minimal:arm64" in r.image["packages"]
    # the host side attached exactly one peer per VM, each once, and cleaned up
    peers = r.hypervisor["peers"]
    assert peers["service"]["connections"] == peers["front-end"]["connections"] == 1
    assert _shm() == before
    assert (tmp_path / "service" / "console.log").stat().st_size > 0


def test_backend_crash_is_blamed_on_the_service_vm(tmp_path: Path) -> None:
    r = up_service_vm(tmp_path, fault="backend-crash")
    assert not r.ok and r.failed_vm == "service"
    checks = {c.name: c for c in r.checks}
    module = checks["front-end: virtio-msg module"]
    assert "no answer to message 0x2" in module.detail and "device side dead?" in module.detail
    assert not checks["service VM: back-end process"].ok


def test_late_service_vm_times_out_on_the_front_end(tmp_path: Path) -> None:
    r = up_service_vm(tmp_path, fault="late-service")
    assert not r.ok and r.failed_vm == "service"
    checks = {c.name: c for c in r.checks}
    assert (
        "no message memory header within 5000 ms" in checks["front-end: virtio-msg module"].detail
    )
    assert not checks["service VM: running"].ok
    assert r.hypervisor["peers"]["service"]["connections"] == 0


def test_boot_timeout_leaves_no_vm_behind(tmp_path: Path) -> None:
    before = _shm()
    r = up_service_vm(tmp_path, boot_timeout=0.2)
    assert not r.ok and r.failed_vm == "service"
    assert r.error and "did not appear within" in r.error
    leftovers = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(tmp_path).encode() in cmdline:
            leftovers.append(pid)
    assert leftovers == []
    assert _shm() == before


def test_service_vm_restart_resets_and_reconnects_the_front_ends_devices(
    tmp_path: Path,
) -> None:
    before = _shm()
    r = up_service_vm(tmp_path, fault="service-restart")
    failed = [(c.name, c.detail) for c in r.checks if not c.ok]
    assert r.ok, (r.error, failed, r.kernel_log[-12:])
    for name in (
        "front-end: round 1 write/read-back",
        "front-end: in-flight I/O fails, no hang",
        "front-end: log names the failed device",
        "front-end: devices reset and reconnected",
        "front-end: round 2 write/read-back",
        "front-end: round 1 data survives",
        "front-end: hwrng after restart",
        "host: both rounds in the disk image",
        "host: service VM re-attached as the same peer",
    ):
        check = r.check(name)
        assert check is not None and check.ok, name
    # the reader failed promptly: detection (watch + PING timeout) well under the bound
    assert r.timings["io_failed_after_kill"] < 30
    # the module saw a new epoch and re-probed both devices (blk, rng)
    log = "\n".join(r.kernel_log)
    assert "restarted (epoch 1 -> 2)" in log
    assert log.count("reconnected, driver") == 2
    assert r.backend["adopted"] and r.backend["epoch"] == 2
    assert _shm() == before
    assert (tmp_path / "service-restarted" / "console.log").stat().st_size > 0
