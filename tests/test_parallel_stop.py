"""Ctrl-C with parallel targets can never hang: bounded stop even when a worker is stuck.

`run_on_target` is replaced by workers that register a target and then block in a way that
cutting power does not end (the failure mode seen on a fresh machine: `edgevirt test
--parallel 2` still running 60 s after SIGINT). run_parallel must cut every target's power,
wait at most STOP_GRACE, sweep the targets once more, and re-raise the interrupt.
"""

from __future__ import annotations

import _thread
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgevirt.board import load_board
from edgevirt.deploy.target import DeployOptions
from edgevirt.errors import ConfigError
from edgevirt.suite import session


class FakePower:
    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def _fake_target(name: str) -> SimpleNamespace:
    return SimpleNamespace(board=SimpleNamespace(name=name), power=FakePower())


@pytest.fixture
def board():
    return load_board("qemu-virt")


def test_interrupt_with_a_stuck_worker_returns_within_the_grace(monkeypatch, board, tmp_path):
    forever = threading.Event()  # never set: the worker ignores power being cut
    made: list[SimpleNamespace] = []

    def stuck(board, suites, opts, *, started, **kw):  # type: ignore[no-untyped-def]
        t = _fake_target(kw["name"])
        made.append(t)
        started(t)
        forever.wait()

    monkeypatch.setattr(session, "run_on_target", stuck)
    monkeypatch.setattr(session, "STOP_GRACE", 0.5)
    threading.Timer(0.5, _thread.interrupt_main).start()
    release = threading.Timer(10, forever.set)  # so a regression fails instead of hanging
    release.start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        session.run_parallel(board, [], DeployOptions(Path(tmp_path)), 2)
    assert time.monotonic() - t0 < 3.0
    release.cancel()
    forever.set()
    assert len(made) == 2
    # Power cut once when interrupted and once more in the final sweep.
    assert all(t.power.closed == 2 for t in made)


def test_a_worker_that_starts_after_the_interrupt_is_refused_and_closed(
    monkeypatch, board, tmp_path
):
    gate = threading.Event()
    made: list[SimpleNamespace] = []
    refused: list[str] = []

    def late(board, suites, opts, *, started, **kw):  # type: ignore[no-untyped-def]
        gate.wait(5)  # registers only after the interrupt
        t = _fake_target(kw["name"])
        made.append(t)
        try:
            started(t)
        except Exception as e:
            refused.append(str(e))
            raise

    monkeypatch.setattr(session, "run_on_target", late)
    monkeypatch.setattr(session, "STOP_GRACE", 2.0)

    def interrupt_then_release() -> None:
        _thread.interrupt_main()
        time.sleep(0.2)
        gate.set()

    threading.Timer(0.3, interrupt_then_release).start()
    with pytest.raises(KeyboardInterrupt):
        session.run_parallel(board, [], DeployOptions(Path(tmp_path)), 2)
    assert len(refused) == 2 and "interrupted" in refused[0]
    assert all(t.power.closed >= 1 for t in made)


def test_a_worker_setup_error_stops_the_others_and_is_raised(monkeypatch, board, tmp_path):
    forever = threading.Event()
    made: list[SimpleNamespace] = []

    def work(board, suites, opts, *, started, **kw):  # type: ignore[no-untyped-def]
        t = _fake_target(kw["name"])
        made.append(t)
        started(t)
        if kw["name"].endswith("-1"):
            raise ConfigError("board file broken")
        forever.wait()

    monkeypatch.setattr(session, "run_on_target", work)
    monkeypatch.setattr(session, "STOP_GRACE", 0.5)
    with pytest.raises(ConfigError, match="board file broken"):
        session.run_parallel(board, [], DeployOptions(Path(tmp_path)), 2)
    assert all(t.power.closed >= 1 for t in made)
