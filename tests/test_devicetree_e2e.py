"""A guest boots with a composed DTB that carries virtio-msg nodes (no driver binds them yet).

Real QEMU virt with the carve-out NUMA topology, the cached kernel, the busybox initramfs
of `edgevirt up`; the DTB is `edgevirt dt compose --spec`'s front-end output. The guest
must boot to its agent, see the nodes in /proc/device-tree, and create the restricted pool.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from edgevirt.board import load_board
from edgevirt.console.expect import Console
from edgevirt.deploy.qemu import QemuConfig, QemuProcess, wait_for_path
from edgevirt.image.kernel import build_kernel
from edgevirt.report import Reporter
from edgevirt.up import build_initramfs

pytestmark = pytest.mark.e2e

SPEC = """
name = "msg-boot"
[[vm]]
name = "guest"
role = "frontend"
[[vm]]
name = "service"
role = "service"
[[carveout]]
name = "shared"
size = "64M"
[msg]
doorbell = 0x0c000000
[[device]]
type = "rng"
transport = "msg"
[[device]]
type = "blk"
transport = "msg"
"""


def test_guest_boots_with_virtio_msg_nodes(tmp_path: Path) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC)
    out = tmp_path / "dt"
    r = subprocess.run(
        [sys.executable, "-m", "edgevirt", "dt", "compose", "--spec", str(spec), "-o", str(out)]
        + ["--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["placed"][0]["base"] == "0x5c000000"  # auto: the top of RAM = NUMA node 1

    board = load_board("qemu-virt")
    kb = build_kernel()
    initrd = build_initramfs(tmp_path / "initramfs.cpio.gz", Reporter())
    shm = Path("/dev/shm") / f"edgevirt-dte2e-{os.getpid()}-{secrets.token_hex(4)}"
    cfg = QemuConfig(board.qemu, shm)
    cfg.kernel, cfg.initrd, cfg.dtb = kb.image, initrd, out / "guest.dtb"
    cfg.console_socket = tmp_path / "console.sock"
    cfg.append = f"console={board.console_kernel} panic=-1"
    qemu = QemuProcess(cfg, tmp_path / "qemu.log")
    console = None
    try:
        wait_for_path(cfg.console_socket, 30, "QEMU console socket", qemu)
        console = Console.open(f"unix://{cfg.console_socket}", log_path=tmp_path / "console.log")
        console.expect(rb"EDGEVIRT-AGENT-READY[^\n]*\n", 120, qemu.check_alive)
        node = "/proc/device-tree/virtio-msg@c000000"
        res = console.run(f"cat {node}/compatible; echo; cat {node}/edgevirt,role", 20)
        assert res.status == 0 and "edgevirt,virtio-msg" in res.output, res.output
        assert "frontend" in res.output
        res = console.run("ls /proc/device-tree/reserved-memory/", 20)
        assert "restricted-dma@5c000000" in res.output and "virtio-msg-ring@5fffd000" in (
            res.output
        )
        res = console.run("dmesg | grep -i 'restricted DMA pool'", 20)
        assert "0x000000005c000000" in res.output, res.output
        console.sendline("poweroff -f")
        assert qemu.wait(20) is not None
    finally:
        if console is not None:
            console.close()
        qemu.stop()
        shm.unlink(missing_ok=True)
