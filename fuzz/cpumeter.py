"""Run a fuzzer and count the CPU time of it and every process it starts (its back-ends).

The state-machine fuzzers drive back-end processes that libFuzzer never waits for (they
die with their parent through ``PR_SET_PDEATHSIG``), so ``RUSAGE_CHILDREN`` misses them.
This samples ``/proc/<pid>/stat`` (utime + stime) of the whole process tree every few
seconds and keeps each process's last value, so a back-end that was restarted still counts.
It stops the run (SIGTERM, then SIGKILL, to the process group it created) once
``--cpu-minutes`` are reached or ``--max-wall`` seconds passed, and prints one JSON line:
wall time, CPU minutes in total and per command name, and the fuzzer's exit code.

    PYTHONPATH=. nice -n 19 .venv/bin/python fuzz/cpumeter.py --cpu-minutes 30 \\
        --max-wall 5400 -- .venv/bin/python fuzz/fuzz_vhost_user_seq.py CORPUS -max_len=512
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float, str] | None:
    """(parent pid, CPU seconds, command name) of a live process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK, name


def tree_cpu(root: int, seen: dict[int, tuple[float, str]]) -> None:
    """Update ``seen`` (pid -> last CPU seconds, name) with every descendant of ``root``."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            stats[int(entry)] = st
    family = {root}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _, _) in stats.items():
            if ppid in family and pid not in family:
                family.add(pid)
                grew = True
    for pid in family:
        if pid in stats:
            # a pid reused by an unrelated process is not in the family: no double count
            seen[pid] = (max(stats[pid][1], seen.get(pid, (0.0, ""))[0]), stats[pid][2])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-minutes", type=float, default=30.0)
    ap.add_argument("--max-wall", type=float, default=5400.0, help="seconds")
    ap.add_argument("--interval", type=float, default=2.0)
    ap.add_argument("--progress", type=float, default=60.0, help="seconds between lines")
    ap.add_argument("cmd", nargs="+")
    a = ap.parse_args(argv)
    start = time.monotonic()
    proc = subprocess.Popen(a.cmd, start_new_session=True)
    seen: dict[int, tuple[float, str]] = {}
    last = start
    reason = "exited"
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    while proc.poll() is None:
        if stop:
            reason = "stopped (SIGTERM)"
            break
        tree_cpu(proc.pid, seen)
        cpu = sum(c for c, _ in seen.values())
        now = time.monotonic()
        if now - last >= a.progress:
            print(f"cpumeter: {now - start:.0f} s wall, {cpu / 60:.2f} CPU-min",
                  file=sys.stderr, flush=True)  # fmt: skip
            last = now
        if cpu >= a.cpu_minutes * 60:
            reason = "cpu budget reached"
            break
        if now - start >= a.max_wall:
            reason = "wall limit reached"
            break
        time.sleep(a.interval)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    by_name: dict[str, float] = {}
    for c, name in seen.values():
        by_name[name] = by_name.get(name, 0.0) + c / 60
    print(json.dumps({
        "reason": reason, "returncode": proc.returncode,
        "wall_s": round(time.monotonic() - start, 1),
        "cpu_s": round(sum(c for c, _ in seen.values()), 1),
        "cpu_min": round(sum(c for c, _ in seen.values()) / 60, 2),
        "processes": len(seen), "cpu_min_by_name": {k: round(v, 2) for k, v in by_name.items()},
    }), flush=True)  # fmt: skip
    return 0 if proc.returncode in (0, -signal.SIGTERM, None) or reason != "exited" else 1


if __name__ == "__main__":
    sys.exit(main())
