"""The service VM restarts under a running front-end: its devices reset and come back.

The scenario, on the two-VM topology of :mod:`edgevirt.servicevm.up` (whose pieces it uses
unchanged):

1. host side, service VM, front-end VM; **round 1**: 4 MiB of random data written to
   ``/dev/vda`` at offset 0 (``O_DIRECT``, ``fsync``) and read back;
2. a reader loop runs on ``/dev/vda`` in the front-end while the service VM's QEMU is
   **killed** (SIGKILL): the reader must stop with an I/O error, not hang, and the kernel
   log must name the device whose requests failed;
3. a new service VM boots on the same host side (same ivshmem peer ID, same disk file);
   its back-end adopts the message memory and bumps the epoch; the front-end's module
   resets and re-probes its devices without a reboot (``reconnected`` in dmesg);
4. **round 2**: 4 MiB at offset 8 MiB written and read back, round 1's data still reads
   back unchanged, ``/dev/hwrng`` answers; the host finds both rounds in the disk image.

Nothing here prints; the result carries the checks, timings and the host's peer counters.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgevirt.board import load_board
from edgevirt.errors import ConfigError, DeployError, EdgevirtError, SetupError
from edgevirt.msgup import MsgQemuConfig, prepare_guest
from edgevirt.report import Reporter
from edgevirt.servicevm.image import build_service_image
from edgevirt.servicevm.peer import PeerConfig
from edgevirt.servicevm.up import (
    CARVEOUT_PCI,
    FRONTEND_ID,
    MSG_PCI,
    SERVICE_ID,
    STATS,
    HypervisorProcess,
    ServiceQemuConfig,
    _boot,
    _Vm,
    service_health,
)
from edgevirt.smoke import Check

ROUND_BYTES = 4 << 20
ROUND2_OFFSET = 8 << 20
_HASH = re.compile(r"^([0-9a-f]{64})\b", re.M)


@dataclass
class RestartResult:
    board: str
    checks: list[Check] = field(default_factory=list)
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    hypervisor: dict = field(default_factory=dict)
    backend: dict = field(default_factory=dict)  # the restarted back-end's stats
    kernel_log: list[str] = field(default_factory=list)  # the front-end's virtio-msg lines
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.checks) and all(c.ok for c in self.checks)

    def check(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)

    def to_json(self) -> dict:
        return {
            "board": self.board,
            "scenario": "service-vm-restart",
            "ok": self.ok,
            "error": self.error,
            "checks": [c.__dict__ for c in self.checks],
            "timings": self.timings,
            "hypervisor": self.hypervisor,
            "backend": self.backend,
            "kernel_log": self.kernel_log,
            "seconds": self.seconds,
        }


def _wait_backend(vm: _Vm) -> None:
    vm.console.run(
        f"i=0; while [ ! -s {STATS} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done;"
        f" test -s {STATS}", 90, vm.alive,
    )  # fmt: skip


def _round(vm: _Vm, label: str, offset: int, abort: object) -> tuple[Check, str]:
    """Write random data at ``offset`` (O_DIRECT + fsync), read it back; returns the check
    and the sha256 the guest computed of what it wrote."""
    mib, seek, name = ROUND_BYTES >> 20, offset >> 20, label.replace(" ", "")
    cmd = (f"dd if=/dev/urandom of=/tmp/{name} bs=1M count={mib} 2>/dev/null"
           f" && sha256sum /tmp/{name}"
           f" && dd if=/tmp/{name} of=/dev/vda bs=1M seek={seek} oflag=direct conv=fsync,notrunc"
           f" 2>/dev/null"
           f"; dd if=/dev/vda bs=1M skip={seek} count={mib} iflag=direct 2>/dev/null"
           f" | sha256sum")  # fmt: skip
    res = vm.console.run(cmd, 120, abort)  # type: ignore[arg-type]
    hashes = _HASH.findall(res.output)
    ok = len(hashes) == 2 and hashes[0] == hashes[1]
    detail = (f"{mib} MiB at {seek} MiB written and read back, sha256 {hashes[0][:16]}…"
              if ok else f"write/read-back differ: {res.output.strip()[-300:]}")  # fmt: skip
    return Check(f"front-end: {label} write/read-back", ok, detail), hashes[0] if hashes else ""


def _read_hash(vm: _Vm, offset: int, abort: object) -> str:
    res = vm.console.run(
        f"dd if=/dev/vda bs=1M skip={offset >> 20} count={ROUND_BYTES >> 20} iflag=direct"
        " 2>/dev/null | sha256sum", 120, abort,  # type: ignore[arg-type]
    )  # fmt: skip
    found = _HASH.findall(res.output)
    return found[0] if found else ""


def _poll(vm: _Vm, shell_cond: str, timeout: float, abort: object) -> bool:
    """Wait in the guest (0.2 s steps) until ``shell_cond`` holds."""
    steps = int(timeout / 0.2)
    res = vm.console.run(
        f"i=0; until {shell_cond}; do [ $i -ge {steps} ] && break; sleep 0.2; i=$((i+1)); done;"
        f" {shell_cond}", timeout + 30, abort,  # type: ignore[arg-type]
    )  # fmt: skip
    return res.status == 0


def _disk_hash(disk: Path, offset: int) -> str:
    with open(disk, "rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(ROUND_BYTES)).hexdigest()


def restart_service_vm(
    build_dir: Path,
    *,
    board: str = "qemu-virt",
    disk_size: int = 64 << 20,
    boot_timeout: float = 180.0,
    fail_timeout: float = 30.0,
    reconnect_timeout: float = 120.0,
    reporter: Reporter | None = None,
) -> RestartResult:
    """Run the restart scenario (module docstring) under ``build_dir``; never raises for a
    failed VM or check (see ``result.error`` and ``result.checks``), only for setup and
    configuration errors."""
    reporter = reporter or Reporter()
    t0 = time.monotonic()
    b = load_board(board)
    s = b.qemu
    build = build_dir.resolve()
    fe_dir, svc_dirs = build / "frontend", [build / "service", build / "service-restarted"]
    for d in (fe_dir, *svc_dirs):
        d.mkdir(parents=True, exist_ok=True)
    result = RestartResult(board=b.name)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    carveout = Path("/dev/shm") / f"edgevirt-svm-carveout-{tag}"
    msgmem = Path("/dev/shm") / f"edgevirt-svm-msg-{tag}"
    hv: HypervisorProcess | None = None
    vms: list[_Vm] = []
    hashes: dict[str, str] = {}
    disk = svc_dirs[0] / "disk.img"
    try:
        reporter.step("front-end image: kernel, virtio_msg.ko, initramfs, DT")
        fcfg = MsgQemuConfig(s, carveout)
        prepare_guest(fcfg, fe_dir, reporter)
        reporter.step("service-VM image")
        pcfg = PeerConfig(CARVEOUT_PCI, s.carveout_base, MSG_PCI, FRONTEND_ID,
                          carveout_size=s.carveout, devices=["blk:path=/dev/vda", "rng"],
                          stats=STATS)  # fmt: skip
        image = build_service_image(pcfg, reporter)
        with open(disk, "wb") as f:
            f.truncate(disk_size)
        reporter.step("host side: shared-memory files + ivshmem server")
        hv = HypervisorProcess(carveout, s.carveout, msgmem, build)
        hv.wait_ready()
        fcfg.ivshmem_socket = hv.sockets["front-end"]
        fcfg.append = f"console={b.console_kernel} panic=-1"

        def service_cfg(d: Path) -> ServiceQemuConfig:
            assert hv is not None
            cfg = ServiceQemuConfig(s, carveout)
            cfg.ivshmem_socket, cfg.disk = hv.sockets["service"], disk
            cfg.kernel, cfg.initrd = image.kernel.image, image.rootfs.path
            cfg.append = f"console={b.console_kernel} panic=-1"
            cfg.console_socket = d / "console.sock"
            cfg.console_socket.unlink(missing_ok=True)
            return cfg

        reporter.step("service VM: boot, wait for the back-end")
        t = time.monotonic()
        svc = _boot("service", service_cfg(svc_dirs[0]), svc_dirs[0], boot_timeout)
        vms.append(svc)
        _wait_backend(svc)
        result.timings["service_boot"] = time.monotonic() - t
        reporter.step("front-end VM: boot")
        t = time.monotonic()
        fe = _boot("front-end", fcfg, fe_dir, boot_timeout)
        vms.append(fe)
        result.timings["frontend_boot"] = time.monotonic() - t
        fe_alive = fe.alive

        reporter.step("round 1: write and read back before the restart")
        check, hashes["round 1"] = _round(fe, "round 1", 0, fe_alive)
        result.checks.append(check)
        if not check.ok:
            raise DeployError(f"round 1 failed before any fault: {check.detail}")

        reporter.step("fault: kill the service VM's QEMU while the front-end reads")
        fe.console.run(
            "(n=0; while dd if=/dev/vda of=/dev/null bs=64k count=64 iflag=direct"
            " 2>/tmp/io.err; do n=$((n+1)); done; echo \"IO-STOPPED after $n reads:"
            " $(cat /tmp/io.err)\") >/tmp/io.log 2>&1 & true", 20, fe_alive,
        )  # fmt: skip
        fe.console.run("sleep 1", 20, fe_alive)
        t_kill = time.monotonic()
        os.killpg(svc.qemu.pid, signal.SIGKILL)
        svc.qemu.wait(20)
        vms.remove(svc)
        svc.console.close()
        svc.qemu.stop()
        stopped = _poll(fe, "grep -q IO-STOPPED /tmp/io.log", fail_timeout, fe_alive)
        result.timings["io_failed_after_kill"] = time.monotonic() - t_kill
        io_log = fe.console.run("cat /tmp/io.log", 20, fe_alive).output.strip()
        result.checks.append(Check(
            "front-end: in-flight I/O fails, no hang", stopped and "error" in io_log.lower(),
            f"{io_log[-200:] or 'reader still running'} "
            f"({result.timings['io_failed_after_kill']:.1f}s after the kill)",
        ))  # fmt: skip
        gone = fe.console.run("dmesg | grep 'device side gone'", 20, fe_alive).output
        named = re.search(r"device 0 \((virtio\d+), virtio id 2\)", gone)
        result.checks.append(Check(
            "front-end: log names the failed device", bool(named),
            gone.strip().splitlines()[0][-160:] if gone.strip() else "no 'device side gone'",
        ))  # fmt: skip

        reporter.step("service VM: restart on the same host side")
        t = time.monotonic()
        svc2 = _boot("service", service_cfg(svc_dirs[1]), svc_dirs[1], boot_timeout)
        vms.append(svc2)
        _wait_backend(svc2)
        result.timings["service_reboot"] = time.monotonic() - t
        back = _poll(fe, "[ $(dmesg | grep -c 'virtio-msg: device .*: reconnected') -ge 2 ]"
                     " && [ -b /dev/vda ]", reconnect_timeout, fe_alive)  # fmt: skip
        result.timings["reconnected_after_restart"] = time.monotonic() - t
        lines = fe.console.run("dmesg | grep 'virtio-msg'", 20, fe_alive).output
        result.kernel_log = [ln.strip() for ln in lines.splitlines() if ln.strip()]
        restarted = next((ln for ln in result.kernel_log if "restarted (epoch" in ln), "")
        result.checks.append(Check(
            "front-end: devices reset and reconnected", back and bool(restarted),
            (restarted[-120:] + "; " if restarted else "no new epoch seen; ")
            + f"{sum('reconnected' in ln for ln in result.kernel_log)} devices reconnected",
        ))  # fmt: skip

        reporter.step("round 2: write and read back after the restart; round 1 still there")
        check, hashes["round 2"] = _round(fe, "round 2", ROUND2_OFFSET, fe_alive)
        result.checks.append(check)
        again = _read_hash(fe, 0, fe_alive)
        result.checks.append(Check(
            "front-end: round 1 data survives", again == hashes["round 1"] != "",
            f"sha256 {again[:16]}… {'=' if again == hashes['round 1'] else '≠'} round 1",
        ))  # fmt: skip
        rng = fe.console.run("dd if=/dev/hwrng bs=32 count=2 2>/dev/null | wc -c", 30, fe_alive)
        result.checks.append(Check("front-end: hwrng after restart",
                                   rng.output.strip().endswith("64"),
                                   f"{rng.output.strip()} bytes"))  # fmt: skip
        oops = fe.console.run("dmesg | grep -cE 'Oops|BUG:|WARNING:'", 20, fe_alive).output
        result.checks.append(
            Check(
                "front-end: no oops, BUG or WARNING",
                oops.strip().endswith("0"),
                f"{oops.strip()} matches",
            )
        )

        reporter.step("restarted service VM: health checks")
        svc_checks, result.backend = service_health(svc2, s.carveout, expect_io=True)
        result.checks += svc_checks
        epoch, adopted = result.backend.get("epoch"), result.backend.get("adopted")
        result.checks.append(
            Check(
                "service VM: back-end adopted the message memory",
                bool(adopted) and isinstance(epoch, int) and epoch >= 2,
                f"adopted {adopted}, epoch {epoch}, "
                f"{result.backend.get('skipped')} stale messages skipped",
            )
        )

        reporter.step("power-off: front-end, then service VM")
        fe.console.sendline("poweroff -f")
        if fe.qemu.wait(20) is None:
            raise DeployError("front-end VM did not power off within 20s")
        svc2.console.run("sync", 30)
        svc2.console.sendline("poweroff -f")
        if svc2.qemu.wait(20) is None:
            raise DeployError("service VM did not power off within 20s")
        host = {k: _disk_hash(disk, off) for k, off in (("round 1", 0), ("round 2", ROUND2_OFFSET))}
        ok = all(host[k] == hashes[k] != "" for k in host)
        result.checks.append(
            Check(
                "host: both rounds in the disk image",
                ok,
                ", ".join(f"{k} {host[k][:12]}…" for k in host),
            )
        )
        result.hypervisor = hv.state()
        peer = result.hypervisor.get("peers", {}).get("service", {})
        result.checks.append(Check(
            "host: service VM re-attached as the same peer",
            peer.get("id") == SERVICE_ID and peer.get("connections") == 2
            and peer.get("detaches", 0) >= 1,
            f"peer {peer.get('id')}: {peer.get('connections')} connections, "
            f"{peer.get('detaches')} detaches",
        ))  # fmt: skip
    except (SetupError, ConfigError):
        raise
    except EdgevirtError as e:
        result.error = str(e) + (f" (hint: {e.hint})" if e.hint else "")
    finally:
        for vm in vms:
            vm.console.close()
            vm.qemu.stop()
        if hv is not None:
            result.hypervisor = hv.state() or result.hypervisor
            hv.stop()
        for shm in (carveout, msgmem):
            shm.unlink(missing_ok=True)
        result.seconds = time.monotonic() - t0
        (build / "restart-result.json").write_text(json.dumps(result.to_json(), indent=2))
    return result
