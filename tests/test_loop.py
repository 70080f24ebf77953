"""The back-end's event loop.

Regression (found by fuzz/fuzz_vhost_user_seq.py): a front-end's disconnect and a kick
became readable in the same ``select`` batch; the disconnect's callback closed the vring's
kick fd, and the loop then ran the kick's stale callback, whose ``os.read`` on the closed
fd raised EBADF and ended the back-end process.
"""

from __future__ import annotations

import os
import time

from edgevirt.backend.loop import Loop


def test_loop_stale_event_of_a_reader_removed_in_the_same_batch_is_dropped() -> None:
    loop = Loop()
    a, b = os.eventfd(1, os.EFD_NONBLOCK), os.eventfd(1, os.EFD_NONBLOCK)  # both readable
    ran: list[str] = []
    fds = {"a": a, "b": b}

    def callback(me: str, other: str):  # noqa: ANN202
        def cb() -> None:
            os.read(fds[me], 8)  # EBADF if this fd was closed by the other callback
            ran.append(me)
            loop.remove_reader(fds[other])
            os.close(fds[other])
            fds[other] = -1

        return cb

    loop.add_reader(a, callback("a", "b"))
    loop.add_reader(b, callback("b", "a"))
    loop.every(0.05, loop.stop)  # not from a callback: the batch must run to its end
    loop.run()
    assert len(ran) == 1  # whichever ran first removed and closed the other: no stale call
    os.close(fds[ran[0]])


def test_loop_reader_replaced_on_a_reused_fd_number_is_not_called_for_the_old_event() -> None:
    loop = Loop()
    a, b = os.eventfd(1, os.EFD_NONBLOCK), os.eventfd(1, os.EFD_NONBLOCK)
    calls: list[str] = []

    def first() -> None:
        calls.append("first")
        os.read(a, 8)
        # b goes away and a new fd is registered in its place (often the same number)
        loop.remove_reader(b)
        os.close(b)
        new = os.eventfd(0, os.EFD_NONBLOCK)  # not readable
        loop.add_reader(new, lambda: calls.append("new"))

    def second() -> None:
        calls.append("b")
        os.read(b, 8)

    loop.add_reader(a, first)
    loop.add_reader(b, second)
    loop.every(0.05, loop.stop)
    loop.run()
    # b first is fine; b after first is the stale event of a removed reader
    assert calls in (["first"], ["b", "first"]), calls


def test_a_stop_before_run_is_not_lost():
    """SIGTERM between installing the handler and entering run(): run returns at once, and
    the loop still runs normally the next time."""
    loop = Loop()
    loop.every(1.0, loop.stop)  # the guard: a lost stop fails the timing, never hangs
    loop.stop()
    t0 = time.monotonic()
    loop.run()
    assert not loop.running and time.monotonic() - t0 < 0.4
    ticks: list[int] = []
    loop.every(0.01, lambda: (ticks.append(1), len(ticks) >= 3 and loop.stop()))
    loop.run()
    assert len(ticks) >= 3
    loop.close()


def test_a_signal_during_a_log_write_still_stops_the_loop(monkeypatch):
    """SIGTERM arriving while the main thread writes a log line to stderr: a handler that
    logged made stderr's buffered writer raise "reentrant call" out of the handler, the
    stop was lost and the back-end served on (a 30 s hang in make test)."""
    import io
    import logging
    import signal

    from edgevirt.backend.statsfile import StatsFile, serve_until_signal

    fired: list[int] = []

    class Stderr(io.StringIO):  # io.BufferedWriter's rule: no write inside a write
        busy = False

        def write(self, s: str) -> int:
            if self.busy:
                raise RuntimeError("reentrant call inside <_io.BufferedWriter name='<stderr>'>")
            self.busy = True
            try:
                if "tick" in s and not fired:
                    fired.append(1)
                    os.kill(os.getpid(), signal.SIGTERM)  # handled before write returns
                return super().write(s)
            finally:
                self.busy = False

    err = Stderr()
    monkeypatch.setattr("sys.stderr", err)
    handler = logging.StreamHandler(err)
    root = logging.getLogger()
    root.addHandler(handler)
    monkeypatch.setattr(root, "level", logging.INFO)
    loop = Loop()
    loop.every(0.05, lambda: logging.getLogger("edgevirt.test").warning("tick"))
    loop.every(2.0, loop.stop)  # the guard: a lost stop shows as time, never a hang
    t0 = time.monotonic()
    try:
        serve_until_signal(loop, StatsFile(None), lambda: {})
    finally:
        root.removeHandler(handler)
        loop.close()
    assert fired and time.monotonic() - t0 < 1.0
    assert "signal 15" in err.getvalue()
