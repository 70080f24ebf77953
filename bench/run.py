"""`make bench`: back-end benchmarks, printed as ratios against anchors measured in the same
run (qemu-storage-daemon for blk, the pure-Python ring for the C ring)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import blk, ring  # noqa: E402


def table(rows: list[dict]) -> str:
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def main() -> None:
    print(table(ring.run()))
    print()
    print(table(blk.run()))


if __name__ == "__main__":
    main()
