"""virtio-msg end to end: the guest module built for the guest kernel, a real QEMU with
ivshmem-doorbell and the back-end as its ivshmem server, the smoke suite over the console;
and a dead back-end turning into a timeout rather than a hung boot."""

from __future__ import annotations

import mmap
import os
import re
import shutil
import threading
from pathlib import Path

import pytest

from edgevirt.backend.transport.virtio_msg.channel import MessageMemory
from edgevirt.backend.transport.virtio_msg.ivshmem import IvshmemServer
from edgevirt.board import load_board
from edgevirt.console.expect import Console
from edgevirt.deploy.qemu import QemuConfig, QemuProcess, wait_for_path
from edgevirt.errors import ImageError
from edgevirt.image.kernel import build_kernel
from edgevirt.msgup import build_module, check_module, prepare_guest, up_msg
from edgevirt.report import Reporter

pytestmark = pytest.mark.e2e


def _need_qemu() -> None:
    if not shutil.which("qemu-system-aarch64"):
        pytest.skip("qemu-system-aarch64 not installed")


def _shm_files() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("edgevirt-msg-")}


def test_module_builds_for_the_guest_kernel(tmp_path: Path) -> None:
    kb = build_kernel()
    ko = build_module(kb, tmp_path)
    info = check_module(ko, kb.release)
    assert info["vermagic"].split()[0] == kb.release
    assert info["machine"] == "EM_AARCH64" and info["license"] == "GPL"
    data = ko.read_bytes()
    assert b"alias=pci:v00001AF4d00001110" in data  # binds ivshmem
    assert b"alias=of:N*T*Cedgevirt,virtio-msg" in data  # and the bus node
    with pytest.raises(ImageError, match="vermagic"):
        check_module(ko, "5.10.0")


def test_smoke_suite_passes_over_virtio_msg(tmp_path: Path) -> None:
    _need_qemu()
    before = _shm_files()
    result = up_msg(tmp_path / "out", boot_timeout=120)
    failed = [f"{c.name}: {c.detail}" for c in result.checks if not c.ok]
    assert result.error is None, result.error
    assert result.ok, failed
    names = {c.name for c in result.checks}
    assert {"virtio features", "blk write/read-back", "hwrng", "disk image on host"} <= names
    assert result.backend["messages_in"] > 0 and result.backend["protocol_errors"] == 0
    assert _shm_files() == before  # the carve-out file is gone
    console = (tmp_path / "out" / "console.log").read_text(errors="replace")
    assert re.search(r"virtio-msg bus: 64 slots per direction, .* MSI-X", console)
    assert "virtio_mmio" not in (tmp_path / "out" / "guest.dts").read_text()


def test_dead_back_end_times_out_and_the_guest_still_boots(tmp_path: Path) -> None:
    """An ivshmem server that lays out message memory but never answers (a dead device
    side): the module must give up after its timeout and the boot must carry on."""
    _need_qemu()
    board = load_board("qemu-virt")
    s = board.qemu
    shm = tmp_path / "carveout"  # a plain file: QEMU maps it like /dev/shm
    with open(shm, "wb") as f:
        f.truncate(s.carveout)
    qcfg = QemuConfig(s, shm)
    qcfg.ivshmem_socket = tmp_path / "ivshmem.sock"
    prepare_guest(qcfg, tmp_path, Reporter())
    qcfg.append = f"console={board.console_kernel} panic=-1"

    fd = os.memfd_create("dead-device-side")
    os.ftruncate(fd, 64 << 10)
    buf = mmap.mmap(fd, 64 << 10)
    msgmem = MessageMemory.create(memoryview(buf))
    server = IvshmemServer(str(qcfg.ivshmem_socket), fd, 2)
    stop = threading.Event()

    def serve() -> None:  # accept QEMU, then say nothing ever
        while not stop.is_set():
            server.accept()
            stop.wait(0.02)

    t = threading.Thread(target=serve)
    t.start()
    qemu = console = None
    try:
        qemu = QemuProcess(qcfg, tmp_path / "qemu.log")
        assert qcfg.console_socket is not None
        wait_for_path(qcfg.console_socket, 30, "console", qemu)
        console = Console.open(f"unix://{qcfg.console_socket}", log_path=tmp_path / "console.log")
        console.expect(rb"EDGEVIRT-AGENT-READY", 90, qemu.check_alive)
        res = console.run("dmesg | grep virtio-msg; ls /sys/bus/virtio/devices | wc -l", 30)
        assert re.search(
            r"no answer to message 0x2 for device 0 within 5000 ms: device side dead\?", res.output
        )
        assert res.output.split()[-1] == "0"  # no virtio device registered
        assert "probe of virtio-msg failed with error -110" in res.output  # -ETIMEDOUT
        assert msgmem.to_device.available() >= 1  # the request did reach the ring
        console.sendline("poweroff -f")
        qemu.wait(20)
    finally:
        stop.set()
        t.join()
        if console is not None:
            console.close()
        if qemu is not None:
            qemu.stop()
        server.close()
        msgmem.close()
        buf.close()
        os.close(fd)
