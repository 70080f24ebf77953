"""Expect engine CPU cost on a 4 MiB boot log (the hardening issue's console defect).

Replays a synthetic kernel log through :class:`~edgevirt.console.fake.ScriptedPort` in 4 KiB
bursts and waits for a login prompt at its end, twice: with the bounded search window
(default) and with an unbounded one (``SEARCH_WINDOW`` = infinity: every read rescans from
the last match, what the engine did before). Reports CPU seconds (``time.process_time``)
and the bytes handed to the regex engine.

    .venv/bin/python bench/console.py [--mib 4] [--chunk 4096] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgevirt.console import expect as ex  # noqa: E402
from edgevirt.console.fake import ScriptedPort  # noqa: E402


def boot_log(size: int) -> bytes:
    out, n, total = [], 0, 0
    while total < size:
        line = f"[{n / 1000:12.6f}] virtio_mmio a00{n % 32:02x}.virtio_mmio: probe {n}\r\n"
        out.append(line)
        total += len(line)
        n += 1
    return "".join(out).encode()[:size]


def one(log: bytes, chunk: int, window: int | None) -> dict[str, float | int]:
    saved = ex.SEARCH_WINDOW, ex.KEEP_BEHIND
    if window is None:
        ex.SEARCH_WINDOW = ex.KEEP_BEHIND = 1 << 62
    try:
        port = ScriptedPort(
            [log[i : i + chunk] for i in range(0, len(log), chunk)] + [b"\nlogin: "]
        )
        con = ex.Console(port)  # type: ignore[arg-type]
        t0 = time.process_time()
        con.expect(rb"login: ", 600)
        cpu = time.process_time() - t0
        searched = round(con.searched_bytes / 2**20, 1)
        return {"cpu_s": round(cpu, 3), "reads": port.reads, "searched_MiB": searched,
                "buffer_KiB": len(con._buf) // 1024}  # fmt: skip
    finally:
        ex.SEARCH_WINDOW, ex.KEEP_BEHIND = saved


def run(mib: float = 4, chunk: int = 4096, repeat: int = 3) -> list[dict[str, object]]:
    log = boot_log(int(mib * 2**20))
    rows: list[dict[str, object]] = []
    for name, window in (
        ("bounded window (64 KiB)", ex.SEARCH_WINDOW),
        ("rescan from last match", None),
    ):
        runs = [one(log, chunk, window) for _ in range(repeat)]
        best = min(runs, key=lambda r: r["cpu_s"])
        rows.append({"engine": name, "log_MiB": mib, "chunk": chunk, **best,
                     "cpu_s (all runs)": " / ".join(str(r["cpu_s"]) for r in runs)})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=float, default=4)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    from bench.run import table

    print(table(run(a.mib, a.chunk, a.repeat)))


if __name__ == "__main__":
    main()
