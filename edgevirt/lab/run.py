"""Suites on labgrid places: pick and hold the places, run the ordinary target session on
each, one result list (one JUnit file), every place released.

``--place`` is a place name, a glob, or tags (``board=qemu-virt``). With ``--parallel N``
the first N free matching places are taken; with ``--wait S`` missing places are queued for
through coordinator reservations (tags as the filter) for up to S seconds. All places are
held before any target boots, so a shortfall fails before anything ran.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from edgevirt.board import Board, load_board
from edgevirt.deploy.target import DeployOptions, Target
from edgevirt.errors import ConfigError, DeployError
from edgevirt.lab import PlaceBusy
from edgevirt.lab.client import LabClient, parse_filter
from edgevirt.lab.place import PlaceSession
from edgevirt.report import Reporter
from edgevirt.suite.model import Suite
from edgevirt.suite.runner import StepResult
from edgevirt.suite.session import TargetRun, run_on_target

log = logging.getLogger(__name__)


def place_board(session: PlaceSession, board: str | None) -> Board:
    """``--board``, else the place's ``board`` tag."""
    assert session.acquired is not None
    name = board or session.acquired.board
    if not name:
        raise ConfigError(
            f"place {session.name!r} has no 'board' tag to name its board profile",
            hint=f"pass --board, or `labgrid-client -p {session.name} set-tags board=NAME`",
        )
    return load_board(name)


@contextlib.contextmanager
def hold_places(
    client: LabClient,
    pattern: str,
    count: int,
    *,
    wait: float = 0.0,
    reporter: Reporter | None = None,
) -> Iterator[list[PlaceSession]]:
    """Acquire ``count`` places matching ``pattern``; release them all on leaving."""
    reporter = reporter or Reporter()
    matching = client.select(pattern)
    free = [p.name for p in matching if p.state == "free"]
    if len(matching) < count:
        raise PlaceBusy(
            f"--parallel {count}: only {len(matching)} place(s) match {pattern!r} "
            f"({', '.join(p.name for p in matching)})"
        )
    with contextlib.ExitStack() as stack:
        sessions: list[PlaceSession] = []
        if len(free) >= count or wait <= 0:
            if len(free) < count:
                busy = [
                    f"{p.name!r} {p.state} by {p.acquired or f'reservation {p.reservation}'}"
                    for p in matching
                    if p.state != "free"
                ]
                what = (
                    f"place {busy[0]}"
                    if len(matching) == 1
                    else f"{count} free place(s) matching {pattern!r} needed, {len(free)} "
                    f"free; busy: {', '.join(busy)}"
                )
                raise PlaceBusy(
                    what, hint="pass --wait SECONDS to queue with a coordinator reservation"
                )
            for name in free[:count]:
                reporter.step(f"lab: acquire place {name}")
                sessions.append(stack.enter_context(PlaceSession(client, name)))
        else:
            tags = parse_filter(pattern)
            if tags is None and len(matching) == 1:
                tags = {"name": matching[0].name}  # labgrid's scheduler matches names too
            if tags is None:
                raise ConfigError(
                    f"--wait needs one place or tags (e.g. board=NAME), not {pattern!r}, "
                    "which names several places: reservations select places by tags"
                )
            for _ in range(count):
                reporter.step(f"lab: waiting up to {wait:.0f}s for a place matching {tags}")
                token, name = client.reserve(tags, wait)
                reporter.step(f"lab: acquire place {name} (reservation {token})")
                sessions.append(stack.enter_context(PlaceSession(client, name, token=token)))
        yield sessions


@contextlib.contextmanager
def place_target(
    client: LabClient,
    pattern: str,
    opts: DeployOptions,
    *,
    board: str | None = None,
    wait: float = 0.0,
    reporter: Reporter | None = None,
) -> Iterator[tuple[PlaceSession, Target]]:
    """One held place as a :class:`Target` (deploy, console); powered off and released
    on leaving."""
    with hold_places(client, pattern, 1, wait=wait, reporter=reporter) as [session]:
        acq = session.acquired
        assert acq is not None and session.power is not None
        o = replace(
            opts, power=session.power, console_url=acq.console_url, label=f"place {session.name}"
        )
        with Target(place_board(session, board), o, reporter) as target:
            yield session, target


def run_on_places(
    client: LabClient,
    sessions: list[PlaceSession],
    suites: list[Suite],
    opts: DeployOptions,
    *,
    board: str | None = None,
    reporter: Reporter | None = None,
    on_step: Callable[[str, StepResult], None] | None = None,
) -> list[TargetRun]:
    """The suites on every held place at once, each with its own build dir."""
    boards = [place_board(s, board) for s in sessions]
    stop = threading.Event()
    targets: list[Target] = []

    def interrupted() -> None:
        if stop.is_set():
            raise DeployError("interrupted: every place is being powered off and released")

    def started(t: Target) -> None:
        targets.append(t)
        t.strategy.watchers.append(interrupted)

    def one(session: PlaceSession, b: Board) -> TargetRun:
        acq = session.acquired
        assert acq is not None and session.power is not None
        o = replace(
            opts,
            build_dir=opts.build_dir / session.name if len(sessions) > 1 else opts.build_dir,
            power=session.power,
            console_url=acq.console_url,
            label=f"place {session.name}",
        )
        run = run_on_target(
            b,
            suites,
            o,
            name=session.name,
            reporter=reporter,
            on_step=on_step,
            stop=stop,
            started=started,
        )
        failed = " ".join(e for e in [run.error, *(r.error for r in run.results)] if e)
        if failed and not stop.is_set():
            why = explain(session)
            if not why and "console" in failed:
                why = serial_detail(session)
            if why:
                annotate(run, why)
        return run

    if len(sessions) == 1:
        return [one(sessions[0], boards[0])]
    pool = ThreadPoolExecutor(max_workers=len(sessions), thread_name_prefix="place")
    futures = [pool.submit(one, s, b) for s, b in zip(sessions, boards, strict=True)]
    try:
        return [f.result() for f in futures]
    except BaseException:
        stop.set()  # the workers' next console poll raises; power goes off on their way out
        raise
    finally:
        pool.shutdown(wait=True)


def annotate(run: TargetRun, why: str) -> None:
    """Put the lab's reason in front of the run's error, or the suite's and its step's."""
    if run.error and why not in run.error:
        run.error = f"{why} — {run.error}"
    for r in run.results:
        if r.error and why not in r.error:
            r.error = f"{why} — {r.error}"
            for step in r.steps:
                if step.outcome == "error" and why not in step.detail:
                    step.detail = f"{why} — {step.detail}"


def serial_detail(session: PlaceSession) -> str:
    """Which resource a console failure happened on, when the coordinator saw nothing."""
    assert session.acquired is not None
    r = session.acquired.serial
    dev = r.params.get("extra", {}).get("path")
    return (
        f"place {session.name!r}: serial port resource {r.path}"
        + (f" ({dev})" if dev else "")
        + f" served by exporter {r.exporter} at {session.acquired.console_url}"
    )


def explain(session: PlaceSession, settle: float = 3.0) -> str:
    """The coordinator's reason for a failure, if it has one: an exporter that died takes
    a moment to be noticed, so look again for up to ``settle`` seconds."""
    deadline = time.monotonic() + settle
    while True:
        problem = session.diagnose()
        if problem:
            return problem
        if time.monotonic() >= deadline:
            return ""
        time.sleep(0.3)
