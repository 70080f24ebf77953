"""End to end: `edgevirt up` on QEMU virt with the real kernel, back-end and console.

These build the kernel the first time (cached under ~/.cache/edgevirt afterwards) and boot
QEMU under TCG; each runs in a fresh temporary build directory.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import MSG_HOST_SPEC, leftovers

pytestmark = pytest.mark.e2e


def run_up(build: Path, *extra: str, timeout: float = 1500) -> tuple[int, dict, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "edgevirt", "up", "--build-dir", str(build), "--json", *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    result = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}
    return proc.returncode, result, proc.stderr


def test_up_restricted_guest_passes_every_check(tmp_path):
    build = tmp_path / "build"
    code, result, stderr = run_up(build)
    assert code == 0, f"up failed: {result.get('error')}\n{stderr[-2000:]}"
    checks = {c["name"]: c for c in result["checks"]}
    for name in (
        "virtio features",
        "restricted DMA pool",
        "blk write/read-back",
        "hwrng",
        "disk image on host",
        "back-end blk",
        "back-end rng",
    ):
        assert checks[name]["ok"], checks[name]
    # The back-end saw exactly the carve-out and refused nothing.
    size = result["carveout"]["size"]
    for dev in result["backend"]["devices"]:
        assert dev["mapped_bytes"] == size == 64 << 20
        assert dev["refused"] == 0 and dev["broken"] == []
        assert dev["requests"] > 0
    blk = next(d for d in result["backend"]["devices"] if d["device"] == "blk")
    assert blk["bytes_read"] >= 8 << 20  # guest → device: the 8 MiB test write
    assert "ring" in result["backend"] and result["backend"]["ring"].endswith("_ring")
    # Artefacts and logs are kept.
    for name in (
        "guest.dtb",
        "guest.dtbo",
        "guest.dts",
        "console.log",
        "qemu.log",
        "backend.log",
        "initramfs.cpio.gz",
        "result.json",
    ):
        assert (build / name).exists(), name
    assert "EDGEVIRT-AGENT-READY" in (build / "console.log").read_text()
    assert not leftovers(str(build))
    assert not [
        p for p in os.listdir("/dev/shm") if p.startswith("edgevirt-") and str(os.getpid()) in p
    ]


def test_up_without_restriction_fails_fast_and_clearly(tmp_path):
    build = tmp_path / "build"
    t0 = time.monotonic()
    code, result, stderr = run_up(build, "--no-restrict")
    elapsed = time.monotonic() - t0
    assert code == 1
    err = result["error"]
    # The refusal names the offending address and the carve-out bounds.
    assert "outside the carve-out" in err, err
    assert "0x5c000000" in err and "0x60000000" in err, err
    assert "refused the guest" in err
    # Fails long before the 120 s boot timeout: the back-end's verdict ends the wait.
    assert elapsed < 100, elapsed
    # The back-end stayed alive until we stopped it, and touched nothing outside its mapping.
    # Which device the guest sets up first is its probe order, and the run ends at the first
    # refusal: the refusal names a device the back-end marked broken, which had mapped exactly
    # the carve-out; a device the guest had not reached yet mapped nothing.
    devices = result["backend"]["devices"]
    broken = [d for d in devices if d["broken"]]
    assert any(f"{d['device']}: vring" in err for d in broken), (devices, err)
    assert all(d["mapped_bytes"] == 64 << 20 for d in broken), broken
    assert all(d["mapped_bytes"] in (0, 64 << 20) for d in devices), devices
    assert "exited with status" not in err
    assert not leftovers(str(build))


def test_up_takes_transport_and_dt_from_the_spec(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(MSG_HOST_SPEC)
    build = tmp_path / "build"
    code, result, stderr = run_up(build, "--spec", str(spec))
    assert code == 0, f"up failed: {result.get('error')}\n{stderr[-2000:]}"
    assert (result["transport"], result["backend_in"], result["failed_vm"]) == ("msg", "host", None)
    checks = {c["name"]: c for c in result["checks"]}
    assert "assigned to virtio-msg" in checks["restricted DMA pool"]["detail"]
    assert checks["virtio-msg bus"]["ok"] and "MSI-X" in checks["virtio-msg bus"]["detail"]
    assert checks["back-end blk (dev 0)"]["ok"] and checks["virtio-msg protocol"]["ok"]
    # the composer's node, in ivshmem-pci mode, is what the guest bound to
    dts = (build / "guest.dts").read_text()
    assert 'edgevirt,doorbell = "ivshmem-pci"' in dts and "virtio_mmio" not in dts
    assert json.loads((build / "plan.json").read_text())["msg_nodes"] == {"guest": "/virtio-msg"}
    assert "virtio_msg.ko" in result["frontend"]["modules"]
    assert any("message memory" in row["what"] for row in result["memory"])
    assert not leftovers(str(build))
