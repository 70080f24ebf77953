"""The fault ``service-restart``: the service VM restarts under a running front-end, whose
devices reset and come back.

Played by :class:`edgevirt.servicevm.up.ServiceVmBackend` inside :func:`edgevirt.up.up`
(``edgevirt up --backend service-vm --fault service-restart``), after the front-end passed
the smoke suite:

1. **round 1**: 4 MiB of random data written to ``/dev/vda`` at offset 0 (``O_DIRECT``,
   ``fsync``) and read back;
2. a reader loop runs on ``/dev/vda`` in the front-end while the service VM's QEMU is
   **killed** (SIGKILL): the reader must stop with an I/O error, not hang, and the kernel
   log must name the device whose requests failed;
3. a new service VM boots on the same host side (same ivshmem peer ID, same disk file);
   its back-end adopts the message memory and bumps the epoch; the front-end's module
   resets and re-probes its devices without a reboot (``reconnected`` in dmesg);
4. **round 2**: 4 MiB at offset 8 MiB written and read back, round 1's data still reads
   back unchanged, ``/dev/hwrng`` answers; the host finds both rounds in the disk image
   and the service VM re-attached as the same peer.

Nothing here prints; the checks, timings and the front-end's virtio-msg kernel lines land
in the :class:`~edgevirt.up.UpResult`.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from edgevirt.console.expect import Console
from edgevirt.errors import DeployError
from edgevirt.report import Reporter
from edgevirt.smoke import Check

if TYPE_CHECKING:
    from edgevirt.servicevm.up import ServiceVmBackend
    from edgevirt.up import UpResult

ROUND_BYTES = 4 << 20
ROUND2_OFFSET = 8 << 20
#: Seconds for the reader to fail after the kill, and for the devices to come back.
FAIL_TIMEOUT, RECONNECT_TIMEOUT = 30.0, 120.0
_HASH = re.compile(r"^([0-9a-f]{64})\b", re.M)


def _round(
    console: Console, label: str, offset: int, abort: Callable[[], None]
) -> tuple[Check, str]:
    """Write random data at ``offset`` (O_DIRECT + fsync), read it back; returns the check
    and the sha256 the guest computed of what it wrote."""
    mib, seek, name = ROUND_BYTES >> 20, offset >> 20, label.replace(" ", "")
    cmd = (f"dd if=/dev/urandom of=/tmp/{name} bs=1M count={mib} 2>/dev/null"
           f" && sha256sum /tmp/{name}"
           f" && dd if=/tmp/{name} of=/dev/vda bs=1M seek={seek} oflag=direct conv=fsync,notrunc"
           f" 2>/dev/null"
           f"; dd if=/dev/vda bs=1M skip={seek} count={mib} iflag=direct 2>/dev/null"
           f" | sha256sum")  # fmt: skip
    res = console.run(cmd, 120, abort)
    hashes = _HASH.findall(res.output)
    ok = len(hashes) == 2 and hashes[0] == hashes[1]
    detail = (f"{mib} MiB at {seek} MiB written and read back, sha256 {hashes[0][:16]}…"
              if ok else f"write/read-back differ: {res.output.strip()[-300:]}")  # fmt: skip
    return Check(f"front-end: {label} write/read-back", ok, detail), hashes[0] if hashes else ""


def _read_hash(console: Console, offset: int, abort: Callable[[], None]) -> str:
    res = console.run(
        f"dd if=/dev/vda bs=1M skip={offset >> 20} count={ROUND_BYTES >> 20} iflag=direct"
        " 2>/dev/null | sha256sum", 120, abort,
    )  # fmt: skip
    found = _HASH.findall(res.output)
    return found[0] if found else ""


def _poll(console: Console, shell_cond: str, timeout: float, abort: Callable[[], None]) -> bool:
    """Wait in the guest (0.2 s steps) until ``shell_cond`` holds."""
    steps = int(timeout / 0.2)
    res = console.run(
        f"i=0; until {shell_cond}; do [ $i -ge {steps} ] && break; sleep 0.2; i=$((i+1)); done;"
        f" {shell_cond}", timeout + 30, abort,
    )  # fmt: skip
    return res.status == 0


def _disk_hash(disk: Path, offset: int) -> str:
    with open(disk, "rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(ROUND_BYTES)).hexdigest()


class ServiceRestart:
    """The scenario (module docstring) on ``svm``'s service VM; remembers the rounds' hashes
    for the host's check after power-off."""

    def __init__(self, svm: ServiceVmBackend) -> None:
        self.svm = svm
        self.hashes: dict[str, str] = {}

    def run(
        self, reporter: Reporter, result: UpResult, fe: Console, fe_alive: Callable[[], None]
    ) -> None:
        """Steps 1-4 on the front-end's console; ``fe_alive`` raises if the front-end (or,
        while one runs, the service VM) died."""
        reporter.step("round 1: write and read back before the restart")
        check, self.hashes["round 1"] = _round(fe, "round 1", 0, fe_alive)
        result.checks.append(check)
        if not check.ok:
            raise DeployError(f"round 1 failed before any fault: {check.detail}")

        reporter.step("fault: kill the service VM's QEMU while the front-end reads")
        fe.run(
            "(n=0; while dd if=/dev/vda of=/dev/null bs=64k count=64 iflag=direct"
            " 2>/tmp/io.err; do n=$((n+1)); done; echo \"IO-STOPPED after $n reads:"
            " $(cat /tmp/io.err)\") >/tmp/io.log 2>&1 & true", 20, fe_alive,
        )  # fmt: skip
        fe.run("sleep 1", 20, fe_alive)
        t_kill = time.monotonic()
        self.svm.kill_service()
        stopped = _poll(fe, "grep -q IO-STOPPED /tmp/io.log", FAIL_TIMEOUT, fe_alive)
        result.timings["io_failed_after_kill"] = time.monotonic() - t_kill
        io_log = fe.run("cat /tmp/io.log", 20, fe_alive).output.strip()
        result.checks.append(Check(
            "front-end: in-flight I/O fails, no hang", stopped and "error" in io_log.lower(),
            f"{io_log[-200:] or 'reader still running'} "
            f"({result.timings['io_failed_after_kill']:.1f}s after the kill)",
        ))  # fmt: skip
        gone = fe.run("dmesg | grep 'device side gone'", 20, fe_alive).output
        named = re.search(r"device 0 \((virtio\d+), virtio id 2\)", gone)
        result.checks.append(Check(
            "front-end: log names the failed device", bool(named),
            gone.strip().splitlines()[0][-160:] if gone.strip() else "no 'device side gone'",
        ))  # fmt: skip

        reporter.step("service VM: restart on the same host side")
        t = time.monotonic()
        self.svm.boot_service(self.svm.build / "service-restarted")
        result.timings["service_reboot"] = time.monotonic() - t
        back = _poll(fe, "[ $(dmesg | grep -c 'virtio-msg: device .*: reconnected') -ge 2 ]"
                     " && [ -b /dev/vda ]", RECONNECT_TIMEOUT, fe_alive)  # fmt: skip
        result.timings["reconnected_after_restart"] = time.monotonic() - t
        lines = fe.run("dmesg | grep 'virtio-msg'", 20, fe_alive).output
        result.kernel_log = [ln.strip() for ln in lines.splitlines() if ln.strip()]
        restarted = next((ln for ln in result.kernel_log if "restarted (epoch" in ln), "")
        result.checks.append(Check(
            "front-end: devices reset and reconnected", back and bool(restarted),
            (restarted[-120:] + "; " if restarted else "no new epoch seen; ")
            + f"{sum('reconnected' in ln for ln in result.kernel_log)} devices reconnected",
        ))  # fmt: skip

        reporter.step("round 2: write and read back after the restart; round 1 still there")
        check, self.hashes["round 2"] = _round(fe, "round 2", ROUND2_OFFSET, fe_alive)
        result.checks.append(check)
        again = _read_hash(fe, 0, fe_alive)
        result.checks.append(Check(
            "front-end: round 1 data survives", again == self.hashes["round 1"] != "",
            f"sha256 {again[:16]}… {'=' if again == self.hashes['round 1'] else '≠'} round 1",
        ))  # fmt: skip
        rng = fe.run("dd if=/dev/hwrng bs=32 count=2 2>/dev/null | wc -c", 30, fe_alive)
        result.checks.append(Check("front-end: hwrng after restart",
                                   rng.output.strip().endswith("64"),
                                   f"{rng.output.strip()} bytes"))  # fmt: skip
        oops = fe.run("dmesg | grep -cE 'Oops|BUG:|WARNING:'", 20, fe_alive).output
        result.checks.append(
            Check("front-end: no oops, BUG or WARNING", oops.strip().endswith("0"),
                  f"{oops.strip()} matches")
        )  # fmt: skip

    @staticmethod
    def service_check(backend: dict) -> Check:
        """The restarted back-end (its stats, read in the service VM) took over."""
        epoch, adopted = backend.get("epoch"), backend.get("adopted")
        return Check(
            "service VM: back-end adopted the message memory",
            bool(adopted) and isinstance(epoch, int) and epoch >= 2,
            f"adopted {adopted}, epoch {epoch}, {backend.get('skipped')} stale messages skipped",
        )

    def host_checks(self, disk: Path, hypervisor: dict, service_id: int) -> list[Check]:
        """After power-off: both rounds in the disk image, one peer re-attached."""
        host = {k: _disk_hash(disk, off) for k, off in (("round 1", 0), ("round 2", ROUND2_OFFSET))}
        ok = all(host[k] == self.hashes.get(k, "") != "" for k in host)
        peer = hypervisor.get("peers", {}).get("service", {})
        return [
            Check("host: both rounds in the disk image", ok,
                  ", ".join(f"{k} {host[k][:12]}…" for k in host)),
            Check(
                "host: service VM re-attached as the same peer",
                peer.get("id") == service_id and peer.get("connections") == 2
                and peer.get("detaches", 0) >= 1,
                f"peer {peer.get('id')}: {peer.get('connections')} connections, "
                f"{peer.get('detaches')} detaches",
            ),
        ]  # fmt: skip
