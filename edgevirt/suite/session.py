"""Boot a target, run suites on it, power it off: one call per target, N targets at once.

Each parallel target gets its own build directory (``<build>/<board>-<i>``), hence its own
QEMU sockets, carve-out file, back-end and logs. Threads only wait on consoles and child
processes, so they scale with QEMU, not with Python.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
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


#: After Ctrl-C, how long the workers get to unwind once every target's power is cut.
STOP_GRACE = 15.0


def run_parallel(
    board: Board,
    suites: list[Suite],
    opts: DeployOptions,
    count: int,
    *,
    reporter: Reporter | None = None,
    on_step: Callable[[str, StepResult], None] | None = None,
) -> list[TargetRun]:
    """The same suites on ``count`` instances of a QEMU board at once.

    Ctrl-C (or SIGTERM turned into it, or a worker's setup error) stops every target within
    a bounded time: power is cut on each (their consoles drop, so the workers' waits end),
    the workers get :data:`STOP_GRACE` seconds, and targets are closed once more in case a
    worker powered one on meanwhile. Workers are daemon threads: one stuck in a call that
    power cannot end never keeps the process alive.
    """
    if count == 1:
        return [run_on_target(board, suites, opts, reporter=reporter, on_step=on_step)]
    if not board.is_qemu:
        raise ConfigError(f"--parallel needs a QEMU board; {board.name} is a real board")
    stop = threading.Event()
    lock = threading.Lock()
    targets: list[Target] = []
    results: dict[int, TargetRun] = {}
    errors: list[BaseException] = []

    def started(t: Target) -> None:
        with lock:
            targets.append(t)
        if stop.is_set():
            raise EdgevirtError(f"{t.board.name}: stopping (interrupted)")

    def one(i: int) -> None:
        o = DeployOptions(**{**opts.__dict__, "build_dir": opts.build_dir / f"{board.name}-{i}"})
        try:
            results[i] = run_on_target(
                board,
                suites,
                o,
                name=f"{board.name}-{i}",
                reporter=reporter,
                on_step=on_step,
                stop=stop,
                started=started,
            )
        except BaseException as e:  # handed to the main thread, which decides
            errors.append(e)

    workers = [
        threading.Thread(target=one, args=(i,), name=f"target-{i}", daemon=True)
        for i in range(count)
    ]
    for w in workers:
        w.start()
    try:
        while any(w.is_alive() for w in workers):
            if errors and not stop.is_set():
                raise errors[0]
            time.sleep(0.1)  # interruptible: Ctrl-C lands here
        if errors:
            raise errors[0]
    except BaseException:
        _stop_all(stop, lock, targets, workers)
        raise
    return [results[i] for i in range(count)]


def _close_all(lock: threading.Lock, targets: list[Target]) -> None:
    with lock:
        current = list(targets)
    for t in current:
        try:
            t.power.close()
        except Exception as e:  # keep closing the others
            log.warning("%s: closing its power failed: %s", t.board.name, e)


def _stop_all(
    stop: threading.Event,
    lock: threading.Lock,
    targets: list[Target],
    workers: list[threading.Thread],
) -> None:
    """Cut every target's power, give the workers a bounded time, sweep again."""
    stop.set()
    # A second Ctrl-C must not abandon the cleanup halfway (QEMUs left running).
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        _close_all(lock, targets)
        deadline = time.monotonic() + STOP_GRACE
        for w in workers:
            w.join(max(0.0, deadline - time.monotonic()))
        stuck = [w.name for w in workers if w.is_alive()]
        if stuck:
            log.warning(
                "%s did not stop within %.0fs; their targets were closed", stuck, STOP_GRACE
            )
        _close_all(lock, targets)  # whatever a worker powered on after the first sweep
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGINT, previous)
