"""`edgevirt up`: the whole path on QEMU virt, each step a library function.

device tree → kernel + initramfs → back-end process → QEMU → smoke suite on the console →
power-off → report. Every process started here is stopped here, on success or failure.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgevirt.board import load_board
from edgevirt.deploy.backend_process import BackendProcess, backend_socket
from edgevirt.deploy.machine import build_initramfs, compose_dtb
from edgevirt.deploy.target import DeployOptions, Target
from edgevirt.errors import ConfigError, DeployError, EdgevirtError, SetupError
from edgevirt.report import Reporter
from edgevirt.smoke import DISK_STEP, DISK_TEST_BYTES, Check, smoke_suite
from edgevirt.suite.runner import run_suite

__all__ = [
    "BackendProcess",
    "backend_socket",
    "build_initramfs",
    "compose_dtb",
    "up",
    "UpOptions",
    "UpResult",
]

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


@dataclass
class UpOptions:
    build_dir: Path
    board: str = "qemu-virt"
    restrict: bool = True
    disk_size: int = 64 << 20
    boot_timeout: float = 120.0
    kernel_fragment: Path | None = None


@dataclass
class UpResult:
    board: str
    restrict: bool
    checks: list[Check] = field(default_factory=list)
    backend: dict = field(default_factory=dict)
    carveout: tuple[int, int] = (0, 0)
    error: str | None = None
    artefacts: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.checks) and all(c.ok for c in self.checks)

    def to_json(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        d["carveout"] = {"base": hex(self.carveout[0]), "size": self.carveout[1]}
        return d


# -- steps ----------------------------------------------------------------------------------


def host_checks(result: UpResult, disk: Path, disk_output: str | None, stats: dict) -> list[Check]:
    checks = []
    if disk_output is not None:
        hashes = re.findall(r"^([0-9a-f]{64})\b", disk_output, re.M)
        with open(disk, "rb") as f:
            host = hashlib.sha256(f.read(DISK_TEST_BYTES)).hexdigest()
        ok = bool(hashes) and hashes[0] == host
        checks.append(
            Check(
                "disk image on host",
                ok,
                f"host sha256 of first 8 MiB {host[:16]}… "
                + ("matches the guest" if ok else "differs from the guest"),
            )
        )
    base, size = result.carveout
    devs = stats.get("devices", [])
    for d in devs:
        mapped, refused = d.get("mapped_bytes", 0), d.get("refused", 0)
        ok = mapped == size and refused == 0 and d.get("requests", 0) > 0 and not d.get("broken")
        checks.append(
            Check(
                f"back-end {d['device']}",
                ok,
                f"mapped {mapped:#x} bytes (carve-out {size:#x}), {d.get('requests', 0)} requests, "
                f"{refused} refused" + (f", broken: {d['broken']}" if d.get("broken") else ""),
            )
        )
    if not devs:
        checks.append(Check("back-end", False, "no statistics from the back-end"))
    return checks


def up(opts: UpOptions, reporter: Reporter | None = None) -> UpResult:
    reporter = reporter or Reporter()
    t0 = time.monotonic()
    board = load_board(opts.board)
    build = opts.build_dir.resolve()
    build.mkdir(parents=True, exist_ok=True)
    result = UpResult(
        board=board.name,
        restrict=opts.restrict,
        carveout=(board.qemu.carveout_base, board.qemu.carveout),
    )
    target: Target | None = None
    try:
        target = Target(
            board,
            DeployOptions(
                build,
                restrict=opts.restrict,
                boot_timeout=opts.boot_timeout,
                kernel_fragment=opts.kernel_fragment,
            ),
            reporter,
        )
        machine = target.machine
        if machine is None:
            raise ConfigError(f"{board.path}: `up` needs a QEMU board")
        target.prepare()
        console = target.boot()
        reporter.step("smoke suite over the serial console")
        sr = run_suite(
            smoke_suite(),
            console,
            variables=target.vars(),
            abort=target.strategy.abort,
            target=board.name,
        )
        result.checks += [Check(s.name, s.ok, s.detail) for s in sr.steps if s.outcome != "skipped"]
        if sr.error is not None:
            raise DeployError(sr.error)
        reporter.step("power-off")
        console.sendline("poweroff -f")
        if not machine.wait_exit(20):
            raise DeployError("guest did not power off within 20s")
        machine.off()
        assert machine.backend is not None
        stats = machine.backend.stats()
        result.backend = stats
        disk = next((s.output for s in sr.steps if s.name == DISK_STEP), None)
        result.checks += host_checks(result, machine.disk, disk, stats)
    except (SetupError, ConfigError):
        raise  # the host or an input file is at fault, not the target: exit codes 3 and 4
    except EdgevirtError as e:
        result.error = str(e)
        if e.hint:
            result.error += f" (hint: {e.hint})"
    finally:
        if target is not None:
            target.close()
            m = target.machine
            if m is not None and m.backend is not None:
                result.backend = result.backend or m.backend.stats()
        result.seconds = time.monotonic() - t0
        result.artefacts = {p.name: str(p) for p in sorted(build.iterdir()) if p.is_file()}
        (build / "result.json").write_text(json.dumps(result.to_json(), indent=2))
    return result
