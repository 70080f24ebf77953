"""What several test files need: run the CLI as a user does, find leftover processes, know
whether io_uring works here, wait for a condition, serve a device to a vhost-user front-end."""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: `up` with virtio-msg and the back-end on the host: blk and rng on the bus of an
#: ivshmem-doorbell PCI device (MSI-X), the carve-out at QEMU virt's NUMA node 1.
MSG_HOST_SPEC = """name = "msg-on-host"
[[carveout]]
name = "carveout"
size = "64M"
placement = 0x5c000000
[msg]
doorbell = "ivshmem-pci"
[[device]]
type = "blk"
transport = "msg"
[[device]]
type = "rng"
transport = "msg"
"""


def edgevirt(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``python -m edgevirt ARGS`` from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "edgevirt", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@functools.cache
def no_uring() -> str | None:
    """None if the blk engine gets io_uring here, else why not (no liburing at build time,
    seccomp, the io_uring_disabled sysctl, no C extension)."""
    from edgevirt.backend.virtq import BlkAio

    if BlkAio is None:
        return "C extension not built"
    fd = os.open("/dev/zero", os.O_RDONLY)
    try:
        aio = BlkAio(fd, 8, 1, True, 8)
        return None if aio.engine == "io_uring" else str(aio.reason)
    finally:
        os.close(fd)


def flat(text: str) -> str:
    """rich wraps long messages: compare with whitespace collapsed."""
    return " ".join(text.split())


def _is_pytest(line: str) -> bool:
    # Temporary paths contain "pytest-of-…": match the test runner's own command only.
    args = line.split(None, 1)[1] if " " in line.strip() else ""
    return "pytest" in args.split(" ", 2)[0] or " -m pytest" in args


def leftovers(marker: str) -> list[str]:
    """Processes (other than the test runner) whose command line mentions ``marker``."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if marker in ln and not _is_pytest(ln)]


def odirect_dir(tmp: Path) -> Path | None:
    """``tmp`` if its file system has O_DIRECT (tmpfs has none), else a directory in the
    repository's build tree that has, else None."""
    for d in (tmp, ROOT / "build" / "odirect-tests"):
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f"probe-{os.getpid()}"
        probe.write_bytes(bytes(4096))
        try:
            os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
            return d
        except OSError:
            continue
        finally:
            probe.unlink()
    return None


def wait_until(pred: Callable[[], object], timeout: float = 5.0) -> bool:
    """Poll ``pred`` until it is true (True) or ``timeout`` seconds passed (False)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def chain_bufs(drv: Any, head: int) -> list[tuple[int, int, int]]:
    """(address, length, flags) of each descriptor of the chain at ``head`` in ``drv``'s
    table, as the synthetic driver wrote them."""
    out, i = [], head
    while True:
        addr, n, flags, nxt = drv.read_desc(i)
        out.append((addr, n, flags))
        if not flags & 1:  # VIRTQ_DESC_F_NEXT
            return out
        i = nxt


@contextlib.contextmanager
def vhost_user(dev: Any, sock: Path, features: int = 0, size: int = 8 << 20) -> Iterator[Any]:
    """``dev`` served by the real vhost-user back-end on ``sock`` (its loop in a thread),
    and a front-end with ``size`` bytes of memory that negotiated ``features`` besides
    VERSION_1 (those the device offers) and sent its memory table. Yields (front-end,
    back-end); stops the loop and closes both after."""
    from edgevirt.backend.loop import Loop
    from edgevirt.backend.transport.vhost_user.backend import VhostUserBackend
    from edgevirt.backend.transport.vhost_user.frontend import VhostUserFrontend

    loop = Loop()
    be = VhostUserBackend(dev, str(sock), loop)
    t = threading.Thread(target=loop.run, daemon=True)
    t.start()
    fe = VhostUserFrontend(be.path, size=size)
    try:
        fe.negotiate(features)
        fe.set_mem_table()
        yield fe, be
    finally:
        loop.stop()
        t.join(5)
        fe.close()
        be.close()
