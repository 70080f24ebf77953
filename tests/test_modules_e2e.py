"""The built image boots under QEMU and edgevirt_dma reports the virtio device's DMA setup."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from edgevirt.deploy.qemucmd import qemu_base
from edgevirt.image.build import build_guest_image


@pytest.mark.e2e
def test_guest_loads_edgevirt_dma_and_reports_rings(tmp_path):
    if not shutil.which("qemu-system-aarch64"):
        pytest.skip("qemu-system-aarch64 not installed")
    img = build_guest_image("qemu-virt", tmp_path)
    cmd = qemu_base("virt", cpu="cortex-a57", memory="512M", extra=[
        "-no-reboot", "-global", "virtio-mmio.force-legacy=false",
        "-device", "virtio-rng-device,iommu_platform=on",
        "-kernel", str(img.image), "-initrd", str(img.initramfs),
        "-append", "console=ttyAMA0 panic=-1",
    ])  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdin is not None and proc.stdout is not None
    out = b""
    try:
        while b"EDGEVIRT-AGENT-READY" not in out:
            chunk = proc.stdout.read1(4096)
            if not chunk:
                break
            out += chunk
        proc.stdin.write(b"echo BEGIN; cat /proc/edgevirt-dma; echo END; poweroff -f\n")
        proc.stdin.flush()
        out += proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
        proc.wait()
    text = out.decode(errors="replace")
    assert "edgevirt_dma: /proc/edgevirt-dma ready" in text
    report = text[text.rindex("BEGIN") : text.rindex("END")]
    assert re.search(
        r"dev virtio0 parent=\S+virtio_mmio id=4 version_1=1 access_platform=1", report
    )
    assert re.search(r"vq virtio0 0 name=input size=\d+ desc=0x[0-9a-f]+ .* in_pool=0", report)
