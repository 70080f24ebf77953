"""In-guest workload (DESIGN §4) with the back-end in the service VM vs on the host.

Both sides use the same front-end image (virtio_msg.ko, restricted pool) and the same
busybox ``dd`` commands as ``bench/guest.py``, timed with the front-end's monotonic clock
(``now at`` in ``/proc/timer_list``): the host side is :func:`edgevirt.msgup.up_msg`'s
topology (back-end = ivshmem server on the host, disk = a host file), the service-VM side is
:func:`edgevirt.servicevm.up.up_service_vm` (back-end in the service VM, disk = the
service VM's virtio-blk); both through :func:`edgevirt.up.up`, smoke suite first, then the
workload. :func:`run` returns rows for bench/SERVICE_VM.md.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable
from pathlib import Path

from edgevirt.console.expect import Console
from edgevirt.errors import EdgevirtError
from edgevirt.servicevm.up import up_service_vm
from edgevirt.up import UpOptions, UpResult, up

WORKLOADS = [
    ("16 MiB sequential read, O_DIRECT, 64 KiB",
     "dd if=/dev/vda of=/dev/null bs=64k count=256 iflag=direct"),
    ("2048 x 4 KiB read, O_DIRECT",
     "dd if=/dev/vda of=/dev/null bs=4k count=2048 iflag=direct"),
    ("16 MiB write + fsync", "dd if=/dev/zero of=/dev/vda bs=64k count=256 conv=fsync"),
]  # fmt: skip
NOW = "sed -n 's/^now at \\([0-9]*\\) nsecs$/\\1/p' /proc/timer_list"


def guest_ms(console: Console, cmd: str, abort: Callable[[], None]) -> float:
    count = re.search(r"count=(\d+)", cmd)
    want = f"{count.group(1) if count else ''}+0 records out"
    r = console.run(f"a=$({NOW}); {cmd} 2>/tmp/dd.err; s=$?; b=$({NOW}); cat /tmp/dd.err; "
                    "echo $s $((b - a))", 300, abort)  # fmt: skip
    status, ns = r.output.strip().splitlines()[-1].split()
    if status != "0" or want not in r.output:
        raise EdgevirtError(f"guest command failed: {cmd}: {r.output[-300:]}")
    return int(ns) / 1e6


def workload(repeat: int) -> Callable[[Console, Callable[[], None]], dict]:
    def run(console: Console, abort: Callable[[], None]) -> dict:
        times: dict[str, list[float]] = {name: [] for name, _ in WORKLOADS}
        for _ in range(repeat):
            for name, cmd in WORKLOADS:
                times[name].append(guest_ms(console, cmd, abort))
        return times

    return run


def host_backend(build: Path, repeat: int) -> dict:
    """The front-end with the back-end on the host (``up --transport msg``): the same
    smoke suite first, then the workload, as on the service-VM side."""
    r = up(UpOptions(build, transport="msg", backend="host", workload=workload(repeat)))
    if not r.ok:
        raise EdgevirtError(f"host back-end run failed: {r.error or _failed(r)}")
    return r.workload


def _failed(r: UpResult) -> str:
    return "; ".join(f"{c.name}: {c.detail}" for c in r.checks if not c.ok)


def run(build: Path, repeat: int = 5) -> list[dict]:
    """Both sides, one after the other; rows of median/min per workload (ms)."""
    host = host_backend(build / "host", repeat)
    svm = up_service_vm(build / "servicevm", workload=workload(repeat))
    if not svm.ok:
        raise EdgevirtError(
            f"service-VM run failed ({svm.failed_vm} VM): {svm.error or _failed(svm)}"
        )
    rows = []
    for name, _ in WORKLOADS:
        h, v = host[name], svm.workload[name]
        rows.append({
            "workload": name,
            "host_median": statistics.median(h), "host_min": min(h),
            "svm_median": statistics.median(v), "svm_min": min(v),
            "ratio_median": statistics.median(v) / statistics.median(h),
            "ratio_min": min(v) / min(h),
        })  # fmt: skip
    return rows
