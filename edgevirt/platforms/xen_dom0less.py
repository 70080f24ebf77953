"""`edgevirt up --platform xen`: the whole picture on Xen 4.17 dom0less.

::

    images + Xen + host DTB → QEMU (Xen builds both domUs) → smoke suite on the front-end
    → isolation scan and health checks on the service domU → power-off → report

Xen is the hypervisor here, not a host process edgevirt wrote: it maps the carve-out and
the message memory into both domains (``xen,reg``), nothing of the front-end's RAM into
the service domain, and connects the static event channel the two use as doorbells.
Every check the QEMU platforms make is made again: features 32/33, every ring inside the
carve-out, 8 MiB round trip, hwrng, the back-end's counters; plus the proof that the
service domain cannot see the front-end's private memory (:func:`isolation_check`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from pathlib import Path

from edgevirt import isolation
from edgevirt.console.expect import Console
from edgevirt.errors import ConfigError, EdgevirtError, SetupError
from edgevirt.platforms.xen_machine import DISK, STATS, XenMachine
from edgevirt.platforms.xen_system import DEVICE_IDS, FRONTEND, SERVICE, XenLayout
from edgevirt.report import Reporter
from edgevirt.smoke import DISK_STEP, Check, backend_checks
from edgevirt.suite.model import load_suite
from edgevirt.suite.runner import run_suite
from edgevirt.up import UpOptions, UpResult

DMA_STEP = "carve-out DMA"


def isolation_check(fe: Console, svc: Console, layout: XenLayout) -> list[Check]:
    """:func:`edgevirt.isolation.isolation_check` with the carve-out secret in the
    carve-out's last page (the DMA pool allocates from the bottom), written with devmem."""
    at = layout.carveout_guest + layout.carveout_size - 0x1000
    return isolation.isolation_check(fe, svc, isolation.devmem_plant(at), "service domain")


#: A guest address nothing is mapped at in the service domain (Xen 4.17's guest layout has
#: nothing between the virtual PCI window and the grant table).
UNMAPPED = 0x30000000


def fault_check(fe: Console, svc: Console) -> list[Check]:
    """A service-domain process touching memory outside its mappings is stopped by a fault;
    Xen, the service domain and the front-end's devices carry on."""
    r = svc.run(f"devmem {UNMAPPED:#x} 32; echo status=$?", 30)
    m = re.search(r"status=(\d+)", r.output)
    status = int(m.group(1)) if m else -1
    why = svc.run("dmesg | tail -n 3 | grep -iE 'abort|fault|devmem' | tail -n 1", 20).output
    alive = svc.run("echo alive", 20).output.strip() == "alive"
    rng = fe.run("dd if=/dev/hwrng bs=64 count=1 2>/dev/null | od -An -tx1 | wc -w", 30)
    works = rng.output.strip() == "64"
    signal = {135: "SIGBUS", 137: "SIGKILL", 139: "SIGSEGV"}.get(status, f"status {status}")
    why = f" (kernel: {why.strip()[:120]})" if why.strip() else ""
    return [Check("isolation: access outside the mappings", status > 128 and alive and works,
                  f"service-domain devmem {UNMAPPED:#x} stopped by {signal}{why}; service domain "
                  f"{'alive' if alive else 'DEAD'}; front-end hwrng "
                  f"{'still works' if works else 'BROKEN: ' + rng.output[-80:]}")]  # fmt: skip


def service_checks(svc: Console, carveout: int) -> tuple[list[Check], dict]:
    pid = svc.run("cat /run/edgevirt/backend.pid; kill -0 $(cat /run/edgevirt/backend.pid)", 20)
    tail = svc.run("tail -n 5 /run/edgevirt/backend.log", 20).output
    checks = [
        Check(
            "service domU: back-end process",
            pid.status == 0,
            f"pid {pid.output.split()[0] if pid.output else '?'} "
            + ("running" if pid.status == 0 else f"not running; log: {tail[-300:]}"),
        )
    ]
    try:
        stats = dict(json.loads(svc.run(f"cat {STATS}", 20).output))
    except ValueError:
        stats = {}
    counts = svc.run("cat /sys/bus/platform/devices/*virtio-msg/counts", 20).output.strip()
    m = re.search(r"port=(\d+) in=(\d+) out=(\d+)", counts)
    link = stats.get("link") or {}
    checks.append(Check("service domU: event channel doorbells",
                        m is not None and int(m.group(2)) > 0 and int(m.group(3)) > 0
                        and link.get("mode") == "xen-evtchn",
                        f"static evtchn port {m.group(1)}: {m.group(2)} notifications in, "
                        f"{m.group(3)} out; back-end link {link.get('mode')}" if m else
                        f"no ev_evtchn counts ({counts!r})"))  # fmt: skip
    checks += backend_checks(stats, carveout, prefix="service domU: ")
    return checks, stats


def up_xen(opts: UpOptions, reporter: Reporter | None = None) -> UpResult:
    """Run the Xen platform; the result is the same :class:`UpResult` as on QEMU."""
    reporter = reporter or Reporter()
    if opts.transport not in (None, "msg") or opts.backend not in (None, "service-vm"):
        raise ConfigError("--platform xen runs virtio-msg with the back-end in a service domU: "
                          "drop --transport/--backend or use msg/service-vm")  # fmt: skip
    if opts.spec is not None or not opts.restrict:
        raise ConfigError("--platform xen takes no --spec or --no-restrict yet")
    if opts.fault not in (None, "backend-crash"):
        raise ConfigError(f"--platform xen: fault {opts.fault!r} not supported (backend-crash is)")
    t0 = time.monotonic()
    build = opts.build_dir.resolve()
    layout = XenLayout()
    if opts.boot not in ("direct", "uboot"):
        raise ConfigError(f"--boot {opts.boot}: expected direct or uboot")
    machine = XenMachine(build, layout, disk_size=opts.disk_size, boot_via=opts.boot)
    result = UpResult(board="qemu-virt-xen", transport="msg", backend_in="service domU (Xen)",
                      carveout=(layout.carveout_guest, layout.carveout_size),
                      fault=opts.fault)  # fmt: skip
    try:
        images = machine.prepare(reporter)
        assert images.dt is not None
        result.frontend = {"modules": [m.name for m in images.frontend.modules],
                           "release": images.frontend.release}  # fmt: skip
        result.image = {"rootfs": str(images.service.path), "xen": images.xen.version}
        result.memory = [{**row, "what": f"front-end: {row['what']}"}
                         for row in images.dt.domain_maps[FRONTEND]]  # fmt: skip
        result.hypervisor = {"xen": images.xen.version, "host_map": images.dt.host_map,
                             "domains": images.dt.domain_maps}  # fmt: skip
        consoles = machine.boot(reporter, opts.boot_timeout)
        result.timings["both_shells"] = time.monotonic() - machine.started
        fe, svc = consoles[FRONTEND], consoles[SERVICE]
        if opts.fault == "backend-crash":
            reporter.step("fault: killing the back-end in the service domU")
            svc.run("kill -9 $(cat /run/edgevirt/backend.pid); sleep 0.5", 20)
        reporter.step("front-end domU: smoke suite over its console (Xen UART, demultiplexed)")
        t = time.monotonic()
        sr = run_suite(load_suite("smoke-xen"), fe, abort=machine.alive, target="xen frontend",
                       variables={"carveout_base": f"{layout.carveout_guest:x}",
                                  "device_count": str(len(DEVICE_IDS))})  # fmt: skip
        result.timings["frontend_suite"] = time.monotonic() - t
        result.checks += [Check(f"front-end: {s.name}", s.ok, s.detail)
                          for s in sr.steps if s.outcome != "skipped"]  # fmt: skip
        outputs = {s.name: s.output for s in sr.steps}
        result.checks.append(_bus_check(outputs.get(DMA_STEP, "")))
        if not all(c.ok for c in result.checks):
            why = fe.run("dmesg | grep 'virtio-msg' | grep -iE 'no |dead|timeout|error|fail'"
                         " | head -n 1", 30).output.strip()  # fmt: skip
            if why:
                result.kernel_log.append(why)
                result.checks.append(Check("front-end: virtio-msg module", False, why))
        if opts.workload is not None and all(c.ok for c in result.checks):
            reporter.step("front-end domU: workload")
            result.workload = opts.workload(fe, machine.alive)
        if opts.fault is None:
            reporter.step("isolation: secrets in front-end RAM and carve-out, scan in service")
            t = time.monotonic()
            result.checks += isolation_check(fe, svc, layout)
            result.timings["isolation_scan"] = time.monotonic() - t
            result.checks += fault_check(fe, svc)
        reporter.step("service domU: health checks")
        checks, result.backend = service_checks(svc, layout.carveout_size)
        result.checks += checks
        hashes = re.findall(r"^([0-9a-f]{64})\b", outputs.get(DISK_STEP, ""), re.M)
        if hashes and opts.fault is None and opts.workload is None:  # a workload rewrites it
            disk = svc.run(f"dd if={DISK} bs=1M count=8 2>/dev/null | sha256sum", 60).output
            result.checks.append(Check("service domU: its disk holds the front-end's data",
                                       disk.split()[:1] == hashes[:1],
                                       f"sha256 {disk.split()[0][:16] if disk else '?'}… of "
                                       f"{DISK} vs front-end {hashes[0][:16]}…"))  # fmt: skip
        reporter.step("power-off: both domUs (Xen stays: no dom0 to stop the machine)")
        for c in (fe, svc):
            c.sendline("poweroff -f")
        result.checks.append(_shutdown_check(consoles))
    except (SetupError, ConfigError):
        raise
    except EdgevirtError as e:
        result.error = str(e) + (f" (hint: {e.hint})" if e.hint else "")
    finally:
        machine.stop()
        result.failed_vm = None if result.ok else _blame(result)
        result.seconds = time.monotonic() - t0
        result.artefacts = {p.name: str(p) for p in sorted(build.iterdir()) if p.is_file()}
        (build / "result.json").write_text(json.dumps(result.to_json(), indent=2))
    return result


def _bus_check(output: str) -> Check:
    devices = re.findall(r"virtio-msg: device (\d+): virtio id (\d+)", output)
    evtchn = re.search(r"Xen event channel (\d+)", output)
    ok = len(devices) == len(DEVICE_IDS) and evtchn is not None
    listed = ", ".join(f"{n}=id {i}" for n, i in devices) or "no devices"
    how = f"over Xen static event channel {evtchn.group(1)}" if evtchn else "no event channel"
    return Check("front-end: virtio-msg bus", ok, f"devices {listed} {how}")


def _shutdown_check(consoles: Mapping[str, Console], timeout: float = 30.0) -> Check:
    """Each domU's kernel says it powered down; Xen itself keeps running (no dom0)."""
    down = []
    for name, c in consoles.items():
        try:
            c.expect(rb"reboot: Power down", timeout)
            down.append(name)
        except EdgevirtError:
            pass
    return Check("Xen: both domUs powered off", len(down) == len(consoles),
                 f"{' and '.join(down) or 'none'} powered down; Xen kept running")  # fmt: skip


def _blame(result: UpResult) -> str:
    failed = [c.name for c in result.checks if not c.ok]
    if any(n.startswith("service") for n in failed) or (result.error or "").startswith("service"):
        return "service"
    return "front-end"


def default_build_dir() -> Path:
    return Path("out") / "qemu-virt-xen"
