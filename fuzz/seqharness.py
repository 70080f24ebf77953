"""What the two state-machine fuzzers share (``fuzz_vhost_user_seq.py``,
``fuzz_virtio_msg_seq.py``): the back-end process under test and the loop of one input.

One back-end process serves input after input; it is restarted only after it died (the
input that killed it is the one reported). One input is a run of steps over front-end
sessions: after every step a *barrier* — a request the back-end always answers, sent on the
same channel, so its answer proves every earlier message was handled — replaces a guessed
sleep, and the step's invariants are checked. A session the back-end dropped (a protocol
error) or that went deaf (the input broke its channel) is closed, its aftermath checked, and
the input goes on in a new session. A back-end that is alive but does not answer the
barrier of a fresh session hangs: that is reported too.

After each session: the back-end's open-fd count returns to its baseline, its RSS stays
within ``RSS_SLACK`` of it, and the session's own final check runs (guard pages, once the
back-end let go of the memory). The back-end dies with its fuzzer (``PR_SET_PDEATHSIG``):
libFuzzer exits without Python's atexit.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
PAGE = 4096
RSS_SLACK = 64 << 20
SETTLE = 10.0  # seconds a disconnect may take to show in the back-end's fd count
MAX_STEPS = 24
REPORT_EVERY = 5000


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class BackendProcess:
    """The process under test: ``argv(dir)`` starts it, ``ready(dir)`` says it listens."""

    def __init__(self, prefix: str, argv: Callable[[Path], list[str]],
                 ready: Callable[[Path], bool], setup: Callable[[Path], None]) -> None:  # fmt: skip
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        (self.dir / "disk.img").touch()
        os.truncate(self.dir / "disk.img", 4 << 20)  # sparse: no disk space per run
        setup(self.dir)
        self._argv, self._ready = argv, ready
        self.proc: subprocess.Popen[bytes] | None = None
        self.baseline_fds = self.baseline_rss = 0
        self.sessions = self.restarts = self.deaf = 0
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, *self._argv(self.dir)],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "backend.log", "ab"),  # noqa: SIM115
            preexec_fn=_die_with_parent,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not self._ready(self.dir):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"back-end did not start; see {self.dir / 'backend.log'}")
            time.sleep(0.02)
        self.baseline_fds = 0  # measured by the first input (run_input)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def fds(self) -> int:
        assert self.proc is not None
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def rss(self) -> int:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.kill()
        self.restarts += 1
        self.start()

    def check_alive(self) -> None:
        # the input that killed the back-end is the one reported (a zombie has no fds)
        assert self.alive(), (
            f"back-end died (exit {self.proc.returncode}); see {self.dir / 'backend.log'}"  # type: ignore[union-attr]
        )

    def settle(self) -> None:
        """After a disconnect: wait (polling, no fixed sleep) until the back-end closed the
        session's fds, then check the process is alive, fds at baseline, RSS bounded."""
        deadline = time.monotonic() + SETTLE
        while self.alive() and self.fds() > self.baseline_fds and time.monotonic() < deadline:
            time.sleep(0.001)
        self.check_alive()
        assert self.fds() <= self.baseline_fds, (
            f"fd leak: {self.fds()} open after disconnect, baseline {self.baseline_fds}"
        )
        assert self.rss() < self.baseline_rss + RSS_SLACK, (
            f"RSS {self.rss() >> 20} MiB, baseline {self.baseline_rss >> 20} MiB"
        )


class Session(Protocol):
    usable: bool  # False once the back-end dropped the session: the next step opens another

    def barrier(self) -> bool:
        """True once every message sent so far was handled (or the back-end dropped the
        session); False when no answer came in time (a channel the input broke)."""

    def check(self) -> None:
        """The step invariants (assertions)."""

    def disconnect(self) -> None: ...

    def check_final(self) -> None:
        """Invariants once the back-end let go of the session (it settled)."""

    def release(self) -> None:
        """Free what the session holds (maps, fds); no checks."""


def _measure_baseline(backend: BackendProcess, open_session: Callable[[], Session]) -> None:
    """After a start: one answered session, then the fd count once it stopped moving."""
    s = open_session()
    try:
        assert s.barrier(), "a freshly started back-end does not answer"
        s.disconnect()
        deadline = time.monotonic() + SETTLE
        prev, stable = -1, 0
        while stable < 20 and time.monotonic() < deadline:  # 20 equal reads, 1 ms apart
            n = backend.fds()
            stable, prev = (stable + 1 if n == prev else 0), n
            time.sleep(0.001)
        backend.baseline_fds, backend.baseline_rss = prev, backend.rss()
    finally:
        s.release()


def _open(backend: BackendProcess, open_session: Callable[[], Session]) -> Session:
    backend.sessions += 1
    if backend.sessions % REPORT_EVERY == 0:  # libFuzzer counts inputs; this, sessions
        print(f"seqharness: {backend.sessions} sessions, {backend.restarts} back-end restarts, "
              f"{backend.deaf} unanswered barriers", file=sys.stderr, flush=True)  # fmt: skip
    try:
        return open_session()
    except (OSError, AssertionError):  # refused: a back-end that died late in the last session?
        try:
            backend.proc.wait(5)  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            pass
        backend.check_alive()
        raise


def _finish(backend: BackendProcess, s: Session) -> None:
    s.disconnect()
    backend.settle()
    s.check_final()
    s.release()


def run_input(backend: BackendProcess, fdp: Any, open_session: Callable[[], Session],
              step: Callable[[Any, Any], None]) -> None:  # fmt: skip
    """One input: steps over sessions, a barrier and the checks after each step."""
    if not backend.alive():
        backend.restart()
    if not backend.baseline_fds:
        _measure_baseline(backend, open_session)
    s = _open(backend, open_session)
    try:
        for _ in range(fdp.ConsumeIntInRange(1, MAX_STEPS)):
            if not s.usable:
                _finish(backend, s)
                s = _open(backend, open_session)
            step(s, fdp)
            answered = s.barrier()
            backend.check_alive()
            s.check()
            if not answered:  # the input broke the channel, or the back-end hangs
                backend.deaf += 1
                _finish(backend, s)
                s = _open(backend, open_session)
                assert s.barrier(), "the back-end is alive but does not answer a new session"
        _finish(backend, s)
    except BaseException:
        s.release()
        raise
