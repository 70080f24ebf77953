"""`edgevirt up --platform qemu`: QEMU virt is the hypervisor.

::

    images (build_guest_image) + device tree → back-end side → front-end boot → smoke suite
    on the console → device checks → power-off → host checks → report (result.json)

The front-end is a :class:`~edgevirt.deploy.target.Target` whose QEMU machine knows the
transport; the back-end side is a :class:`~edgevirt.up.Placement` (a host process, or the
service VM of :mod:`edgevirt.servicevm.up`). The same smoke suite and host checks judge
every combination; every process started here is stopped here, on success or failure.
"""

from __future__ import annotations

import json
import time

from edgevirt.board import load_board
from edgevirt.console.expect import Console
from edgevirt.deploy.target import DeployOptions, Target
from edgevirt.errors import ConfigError, DeployError, EdgevirtError, SetupError
from edgevirt.report import Reporter
from edgevirt.smoke import DISK_STEP, POOL_STEP, Check, msg_bus_check, smoke_suite
from edgevirt.spec import SystemSpec
from edgevirt.suite.runner import run_suite
from edgevirt.up import (
    DEVICES,
    Placement,
    UpOptions,
    UpResult,
    Workload,
    _placement,
    memory_rows,
    resolve,
)


def up_qemu(opts: UpOptions, reporter: Reporter | None = None) -> UpResult:
    """Run the QEMU virt platform: QEMU is the hypervisor, the back-end a host process or a
    service VM (``opts.backend``), over either transport."""
    reporter = reporter or Reporter()
    if opts.boot != "direct":
        raise ConfigError(f"--boot {opts.boot} applies to --platform xen only")
    t0 = time.monotonic()
    board = load_board(opts.board)
    transport, backend, spec = resolve(opts, board)
    build = opts.build_dir.resolve()
    placement = _placement(backend, board, build, opts)
    build.mkdir(parents=True, exist_ok=True)
    q = board.qemu
    result = UpResult(
        board=board.name,
        transport=transport,
        backend_in=backend,
        restrict=opts.restrict,
        carveout=(q.carveout_base, q.carveout),
        fault=opts.fault,
    )
    result.memory = memory_rows(board, result)
    target: Target | None = None
    # Until the images exist nothing has booted: a failure then is the host's build.
    phase = "host build"
    try:
        target = Target(
            board,
            DeployOptions(
                placement.frontend_dir(build),
                restrict=opts.restrict,
                boot_timeout=opts.boot_timeout,
                kernel_fragment=opts.kernel_fragment,
                transport=transport,
                spec=spec,
                **placement.deploy_options(),
            ),
            reporter,
        )
        machine = target.machine
        if machine is None:
            raise ConfigError(f"{board.path}: `up` needs a QEMU board")
        placement.frontend(machine)
        placement.prepare(reporter, result)
        target.prepare()
        if machine.guest_image is not None:
            gi = machine.guest_image
            if gi.kernel.built_seconds:
                result.timings["kernel_build"] = gi.kernel.built_seconds
            result.frontend = {
                "manifest": str(gi.manifest),
                "modules": [m.name for m in gi.modules],
                "release": gi.release,
            }
        phase = "run"
        placement.start(reporter, result)
        target.strategy.watchers += placement.watchers()
        console = target.boot()
        result.timings["frontend_boot"] = target.boot_seconds
        _frontend(target, console, placement, result, spec, reporter, opts.workload)
    except (SetupError, ConfigError):
        raise  # the host or an input file is at fault, not the target: exit codes 3 and 4
    except EdgevirtError as e:
        result.error = str(e) + (f" (hint: {e.hint})" if e.hint else "")
        if phase == "host build":
            result.error = f"host build failed: {result.error}"
            result.failed_vm = "host"
    finally:
        try:
            if target is not None:
                target.close()
                m = target.machine
                if m is not None and m.backend is not None:
                    result.backend = result.backend or m.backend.stats()
        finally:
            placement.close(result)
            result.failed_vm = result.failed_vm or placement.blame(result)
            result.seconds = time.monotonic() - t0
            result.artefacts = {p.name: str(p) for p in sorted(build.iterdir()) if p.is_file()}
            (build / "result.json").write_text(json.dumps(result.to_json(), indent=2))
    return result


def _frontend(
    target: Target,
    console: Console,
    placement: Placement,
    result: UpResult,
    spec: SystemSpec | None,
    reporter: Reporter,
    workload: Workload | None,
) -> None:
    """Smoke suite, transport checks, workload, back-end side checks, power-off, host checks."""
    machine = target.machine
    assert machine is not None
    reporter.step("smoke suite over the serial console")
    t = time.monotonic()
    sr = run_suite(
        smoke_suite(),
        console,
        variables=target.vars(),
        abort=target.strategy.abort,
        target=target.board.name,
    )
    result.timings["frontend_suite"] = time.monotonic() - t
    pre = placement.prefix
    fe = [Check(pre + s.name, s.ok, s.detail) for s in sr.steps if s.outcome != "skipped"]
    result.checks += fe
    if sr.error is not None:
        raise DeployError(sr.error)
    outputs = {s.name: s.output for s in sr.steps}
    for dtype, smoke in machine.smokes.items():
        reporter.step(f"{dtype} smoke checks")
        t = time.monotonic()
        result.checks += smoke.checks(console, pre)
        result.timings[f"frontend_{dtype}"] = time.monotonic() - t
    if result.transport == "msg":
        count = len(spec.devices) if spec else len(DEVICES)
        result.checks.append(msg_bus_check(outputs.get(POOL_STEP, ""), count, pre))
    frontend_ok = all(c.ok for c in result.checks)
    if frontend_ok and workload is not None:
        reporter.step("front-end: workload")
        result.workload = workload(console, target.strategy.abort)
    if frontend_ok:
        placement.under_frontend(reporter, result, console, target.strategy.abort)
    if not frontend_ok and result.transport == "msg":
        why = _module_error(console)
        if why:
            result.checks.append(Check(f"{pre}virtio-msg module", False, why))
    placement.after_suite(reporter, result, frontend_ok)
    reporter.step("power-off")
    console.sendline("poweroff -f")
    if not machine.wait_exit(20):
        raise DeployError("guest did not power off within 20s")
    machine.off()
    placement.power_off(reporter)
    disk = outputs.get(DISK_STEP) if workload is None else None  # a workload rewrites it
    result.checks += placement.host_checks(machine, result, disk, frontend_ok)


def _module_error(console: Console) -> str:
    """The virtio-msg module's own words when the bus did not come up."""
    out = console.run("dmesg | grep 'virtio-msg' | grep -iE 'no |dead|timeout|error'", 20)
    return out.output.strip().splitlines()[0] if out.output.strip() else ""
