"""End to end: SIGKILL the back-end during guest write traffic, restart it; QEMU reconnects
(chardev ``reconnect=1``), the inflight region lets the new back-end finish what the old one
had taken, and the guest reads back every block it wrote.

The QEMU command line is the one `edgevirt up` builds (carve-out topology, restricted pool)
with one vhost-user-blk device whose chardev reconnects.
"""

import hashlib
import json
import os
import re
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

from edgevirt.backend.transport.vhost_user import inflight as infl
from edgevirt.board import load_board
from edgevirt.console.expect import Console
from edgevirt.deploy.qemu import QemuConfig, VhostUserDevice, virtio_mmio_slots, wait_for_path
from edgevirt.image.kernel import build_kernel
from edgevirt.report import Reporter
from edgevirt.up import BackendProcess, backend_socket, build_initramfs, compose_dtb
from tests.helpers import no_uring

pytestmark = pytest.mark.e2e

DATA_MIB = 16
WRITERS = 4


def reconnecting(cmd: list[str], chardev_id: str) -> list[str]:
    """The same command line with ``reconnect=1`` on the vhost-user chardev."""
    out = list(cmd)
    for i, arg in enumerate(out):
        if arg.startswith(f"socket,id={chardev_id},"):
            out[i] = arg + ",reconnect=1"
            return out
    raise AssertionError(f"no chardev {chardev_id} in {cmd}")


def inflight_fd_path(pid: int) -> str | None:
    """QEMU keeps the inflight region's memfd open: find it through /proc (we are root)."""
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if "edgevirt-inflight" in os.readlink(f"/proc/{pid}/fd/{name}"):
                return f"/proc/{pid}/fd/{name}"
        except OSError:
            continue
    return None


def wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Until every thread of ``pid`` has stopped: kill() returns before a SIGSTOP has reached
    them all, and a thread still running changes what the test reads next."""
    deadline = time.monotonic() + timeout
    while True:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
        if states and all(st in "tT" for st in states):
            return
        assert time.monotonic() < deadline, f"process {pid} did not stop: {states}"
        time.sleep(0.0005)


def chains_in_flight(path: str) -> int:
    with open(path, "rb") as f:
        raw = f.read()
    _feat, version, desc_num, _last, _used = infl.QUEUE_HEADER.unpack_from(raw, 0)
    if version != infl.INFLIGHT_VERSION:
        return 0
    return sum(raw[infl.QUEUE_HEADER.size + infl.DESC_STATE.size * h] == 1 for h in range(desc_num))


def stats_requests(path: Path) -> int:
    try:
        return int(json.loads(path.read_text())["devices"][0]["requests"])
    except (OSError, ValueError, KeyError, IndexError):
        return 0


@pytest.mark.parametrize(
    "opts",
    [
        pytest.param("", id="sync"),
        pytest.param(",cache=none,aio=io_uring", id="odirect-io_uring",
                     marks=pytest.mark.skipif(no_uring() is not None, reason="no io_uring here")),
    ],
)  # fmt: skip
def test_backend_killed_mid_write_guest_verifies_every_block(tmp_path, opts):
    board = load_board("qemu-virt")
    build = tmp_path / "build"
    build.mkdir()
    shm = Path("/dev/shm") / f"edgevirt-{os.getpid()}-{secrets.token_hex(4)}"
    sock_dir = build / "sockets"
    sock_dir.mkdir()
    sock = backend_socket(sock_dir, 0, "blk")
    qcfg = QemuConfig(board.qemu, shm, [VhostUserDevice("vhost-user-blk", sock, "vu0")])
    kb = build_kernel(None)
    initrd = build_initramfs(build / "initramfs.cpio.gz", Reporter())
    nodes = [f"/virtio_mmio@{a:x}" for a in virtio_mmio_slots(1)]
    dtb = compose_dtb(board, qcfg, build, True, nodes)
    disk = build / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    qcfg.kernel, qcfg.initrd, qcfg.dtb = kb.image, initrd, dtb
    qcfg.console_socket = build / "console.sock"
    qcfg.append = f"console={board.console_kernel} panic=-1"

    def backend(n: int) -> BackendProcess:
        be = BackendProcess(
            [f"blk:path={disk}{opts}"],
            sock_dir,
            build / f"stats{n}.json",
            build / f"backend{n}.log",
        )
        be.wait_ready()
        return be

    first = backend(1)
    second: BackendProcess | None = None
    qemu_log = open(build / "qemu.log", "wb")
    qemu = subprocess.Popen(
        reconnecting(qcfg.command(), "vu0"),
        stdin=subprocess.DEVNULL,
        stdout=qemu_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    console = None
    try:
        wait_for_path(qcfg.console_socket, 30, "QEMU console socket")
        console = Console.open(f"unix://{qcfg.console_socket}", log_path=build / "console.log")
        console.expect(rb"EDGEVIRT-AGENT-READY[^\n]*\n", 120)
        r = console.run(
            f"dd if=/dev/urandom of=/tmp/data bs=1M count={DATA_MIB} 2>/dev/null && "
            "sha256sum /tmp/data",
            60,
        )
        assert r.status == 0, r.output
        want = r.output.split()[0]
        # Several writers at once, O_DIRECT 4 KiB: the queue holds several requests. Each
        # rewrites its slice until told to stop, so traffic lasts however long catching the
        # back-end takes (the C fast path serves a pass in about a second); rewriting the
        # same data keeps the final contents known. A failed dd is recorded in /tmp/fail.
        per = DATA_MIB * 256 // WRITERS
        writers = " ".join(
            f"(while [ ! -e /tmp/stop ]; do dd if=/tmp/data of=/dev/vda bs=4k skip={i * per} "
            f"seek={i * per} count={per} oflag=direct 2>/dev/null || "
            f"{{ echo {i} >> /tmp/fail; break; }}; done) &"
            for i in range(WRITERS)
        )
        r = console.run(f"rm -f /tmp/stop /tmp/fail; {writers} echo started", 30)
        assert r.status == 0 and r.output.endswith("started"), r.output
        # Kill once the guest's traffic is well under way.
        deadline = time.monotonic() + 60
        while stats_requests(build / "stats1.json") < 50:
            assert time.monotonic() < deadline, "guest write traffic never reached the back-end"
            assert qemu.poll() is None
            time.sleep(0.02)
        # Stop the back-end until it is caught holding requests it has taken (marked in the
        # inflight region QEMU keeps), then kill it there.
        region = inflight_fd_path(qemu.pid)
        assert region, "QEMU holds no inflight region: INFLIGHT_SHMFD not negotiated"
        caught = 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            os.kill(first.proc.pid, signal.SIGSTOP)
            wait_stopped(first.proc.pid)  # the engine's thread may still be marking chains
            caught = chains_in_flight(region)
            if caught:
                break
            os.kill(first.proc.pid, signal.SIGCONT)
            time.sleep(0.0002)
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.proc.wait(5)
        assert caught, "never caught the back-end holding a request"
        killed_at = stats_requests(build / "stats1.json")
        time.sleep(0.5)  # the guest's I/O stalls; QEMU retries the socket every second
        second = backend(2)
        # Every writer finishes its current pass through the new back-end, none failed.
        r = console.run("touch /tmp/stop; wait; cat /tmp/fail 2>/dev/null; [ ! -e /tmp/fail ]", 180)
        assert r.status == 0, f"writers failed: {r.output}"
        r = console.run(
            "echo 3 > /proc/sys/vm/drop_caches; "
            f"dd if=/dev/vda bs=64k count={DATA_MIB * 16} iflag=direct 2>/dev/null | sha256sum",
            60,
        )
        assert r.status == 0, r.output
        assert r.output.split()[0] == want, "guest read back different data"
        console.sendline("poweroff -f")
        assert qemu.wait(30) is not None
        with open(disk, "rb") as f:
            assert hashlib.sha256(f.read(DATA_MIB << 20)).hexdigest() == want
        second.stop()
        stats = json.loads((build / "stats2.json").read_text())["devices"][0]
        assert stats["connections"] >= 1 and stats["broken"] == [] and stats["refused"] == 0
        assert stats["requests"] > 0 and killed_at > 0
        assert stats["connections"] == 1
        log2 = (build / "backend2.log").read_text()
        assert "inflight region" in log2 and "inflight tracked" in log2, log2
        assert ("vring 0: io_uring" in log2) == bool(opts), log2
        # Chains the killed back-end had already published in the used ring are not redone
        # (the region's used_idx lags): at most the ones caught are resubmitted.
        m = re.search(r"resubmitting (\d+) in-flight chains", log2)
        assert (int(m.group(1)) if m else 0) <= caught
    finally:
        if console is not None:
            console.close()
        if qemu.poll() is None:
            os.killpg(qemu.pid, signal.SIGKILL)
            qemu.wait()
        qemu_log.close()
        first.stop()
        if second is not None:
            second.stop()
        shm.unlink(missing_ok=True)
