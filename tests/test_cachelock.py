"""One build per cache key: a second builder waits; staging dirs of dead builds are removed."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

from edgevirt.image.cachelock import build_lock, remove_stale_stages


def _hold(root: str, key: str, hold: float, ready, log: str) -> None:  # type: ignore[no-untyped-def]
    with build_lock(Path(root), key):
        with open(log, "a") as f:
            f.write(f"start {os.getpid()} {time.monotonic()}\n")
        ready.set()
        time.sleep(hold)
        with open(log, "a") as f:
            f.write(f"end {os.getpid()} {time.monotonic()}\n")


def test_second_builder_of_the_same_key_waits_for_the_first(tmp_path):
    log = tmp_path / "log"
    ready = mp.Event()
    first = mp.Process(target=_hold, args=(str(tmp_path), "k", 1.0, ready, str(log)))
    first.start()
    assert ready.wait(10)
    notices: list[str] = []
    with build_lock(tmp_path, "k", on_wait=notices.append):
        lines = log.read_text().split()
        assert lines[0] == "start" and "end" in lines, "entered before the first build ended"
    first.join(10)
    assert notices and f"pid {first.pid}" in notices[0] and "waiting" in notices[0]


def test_other_keys_do_not_wait(tmp_path):
    ready = mp.Event()
    first = mp.Process(target=_hold, args=(str(tmp_path), "a", 3.0, ready, str(tmp_path / "l")))
    first.start()
    assert ready.wait(10)
    t0 = time.monotonic()
    notices: list[str] = []
    with build_lock(tmp_path, "b", on_wait=notices.append):
        pass
    assert time.monotonic() - t0 < 1.0 and not notices
    first.kill()
    first.join()


def test_lock_of_a_killed_builder_is_free(tmp_path):
    ready = mp.Event()
    p = mp.Process(target=_hold, args=(str(tmp_path), "k", 60.0, ready, str(tmp_path / "l")))
    p.start()
    assert ready.wait(10)
    p.kill()
    p.join()
    notices: list[str] = []
    with build_lock(tmp_path, "k", on_wait=notices.append):
        pass
    assert not notices


def test_stale_stages_are_removed_and_live_ones_kept(tmp_path):
    dead = mp.Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()
    same_key = tmp_path / f".build-k-{os.getpid()}"  # ours, but under k's lock it is stale
    other_dead = tmp_path / f".build-x-{dead.pid}"
    other_live = tmp_path / f".build-y-{os.getpid()}"
    old_dead = tmp_path / f".old-z-{dead.pid}"
    entry = tmp_path / "k"
    for d in (same_key, other_dead, other_live, old_dead, entry):
        (d / "src").mkdir(parents=True)
    removed = remove_stale_stages(tmp_path, "k")
    assert set(removed) == {same_key, other_dead, old_dead}
    assert other_live.exists() and entry.exists()
    assert not same_key.exists() and not other_dead.exists() and not old_dead.exists()
