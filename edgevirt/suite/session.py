"""Boot a target, run suites on it, power it off: one call per target, N targets at once.

Each parallel target gets its own build directory (``<build>/<board>-<i>``), hence its own
QEMU sockets, carve-out file, back-end and logs. Threads only wait on consoles and child
processes, so they scale with QEMU, not with Python.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from edgevirt.board import Board
from edgevirt.deploy.target import DeployOptions, Target
from edgevirt.errors import ConfigError, EdgevirtError, SetupError
from edgevirt.report import Reporter
from edgevirt.suite.model import Suite
from edgevirt.suite.runner import StepResult, SuiteResult, run_suite

log = logging.getLogger(__name__)


@dataclass
class TargetRun:
    name: str
    build: Path
    results: list[SuiteResult] = field(default_factory=list)
    boot_seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and all(r.ok for r in self.results)


def run_on_target(
    board: Board,
    suites: list[Suite],
    opts: DeployOptions,
    *,
    name: str | None = None,
    reporter: Reporter | None = None,
    on_step: Callable[[str, StepResult], None] | None = None,
    stop: threading.Event | None = None,
    started: Callable[[Target], None] | None = None,
) -> TargetRun:
    run = TargetRun(name or board.name, opts.build_dir)
    with Target(board, opts, reporter) as target:
        if started is not None:
            started(target)
        try:
            console = target.boot()
            run.boot_seconds = target.boot_seconds
            for suite in suites:
                if stop is not None and stop.is_set():
                    break
                r = run_suite(
                    suite,
                    console,
                    variables=target.vars(),
                    reboot=target.reboot,
                    abort=target.strategy.abort,
                    target=run.name,
                    on_step=(lambda s: on_step(run.name, s)) if on_step else None,
                )
                run.results.append(r)
                console = target.console if target.strategy.console else console
                if r.error:
                    break
        except (SetupError, ConfigError):
            raise
        except EdgevirtError as e:
            run.error = str(e) + (f" (hint: {e.hint})" if e.hint else "")
    return run


def run_parallel(
    board: Board,
    suites: list[Suite],
    opts: DeployOptions,
    count: int,
    *,
    reporter: Reporter | None = None,
    on_step: Callable[[str, StepResult], None] | None = None,
) -> list[TargetRun]:
    """The same suites on ``count`` instances of a QEMU board at once."""
    if count == 1:
        return [run_on_target(board, suites, opts, reporter=reporter, on_step=on_step)]
    if not board.is_qemu:
        raise ConfigError(f"--parallel needs a QEMU board; {board.name} is a real board")
    stop = threading.Event()
    targets: list[Target] = []

    def one(i: int) -> TargetRun:
        o = DeployOptions(**{**opts.__dict__, "build_dir": opts.build_dir / f"{board.name}-{i}"})
        return run_on_target(
            board,
            suites,
            o,
            name=f"{board.name}-{i}",
            reporter=reporter,
            on_step=on_step,
            stop=stop,
            started=targets.append,
        )

    pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="target")
    futures = [pool.submit(one, i) for i in range(count)]
    try:
        return [f.result() for f in futures]
    except BaseException:
        # Ctrl-C or a setup error: cut the power of every target now, so the workers'
        # waits end at once (their consoles drop); each Target context then cleans up.
        stop.set()
        for t in list(targets):
            t.power.close()
        raise
    finally:
        pool.shutdown(wait=True)
