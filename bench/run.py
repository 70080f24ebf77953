"""`make bench`: back-end benchmarks, printed as ratios against anchors measured in the same
run (qemu-storage-daemon for blk, the pure-Python ring for the C ring).

``--guest`` runs the in-guest benchmark instead (bench/guest.py: boots a QEMU guest, needs
the cached kernel); ``--guest-msg`` the in-guest benchmark with the virtio-msg transport
side by side with vhost-user and qemu-storage-daemon (bench/msg.py; also builds the guest
module); ``--guest-keep DIR`` keeps either one's logs in DIR, ``--repeat N`` sets the
repetitions per disk (default 9). Without those, the sections below run (all of them when
none is named): ``--ring`` (bench/ring.py), ``--page-cache`` (bench/blk.py),
``--storage`` (bench/storage.py: edgevirt cache=none against qemu-storage-daemon
cache.direct=on), ``--mq`` (two queues on the disk), ``--mq-ram`` (two queues on a
RAM-backed image), ``--msg-cpu`` (bench/msgrt.py: back-end CPU per request over
virtio-msg and vhost-user, no guest). Each table is followed by the load average before and
after it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import blk, guest, msg, msgrt, ring, storage  # noqa: E402


def table(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(c for r in rows for c in r))
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


FLAGS = {"--guest", "--guest-msg", "--guest-keep", "--repeat", "--ring", "--page-cache",
         "--storage", "--mq", "--mq-ram", "--msg-cpu"}  # fmt: skip


def main() -> None:
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
        return
    unknown = [a for a in sys.argv[1:] if a.startswith("-") and a not in FLAGS]
    if unknown:
        sys.exit(f"bench/run.py: unknown option {unknown[0]} (--help lists them)")
    keep = sys.argv[sys.argv.index("--guest-keep") + 1] if "--guest-keep" in sys.argv else None
    if "--guest-msg" in sys.argv:
        repeat = int(sys.argv[sys.argv.index("--repeat") + 1]) if "--repeat" in sys.argv else 9
        print(table(msg.run(Path(keep) if keep else None, repeat)))
        return
    if "--guest" in sys.argv or keep:
        print(table(guest.run(Path(keep) if keep else None)))
        return
    sections = {
        "--ring": ring.run,
        "--page-cache": blk.run,
        "--storage": storage.run,
        "--mq": storage.measure_mq,
        "--mq-ram": lambda: storage.measure_mq(ram=True),
        "--msg-cpu": msgrt.run,
    }
    chosen = [f for flag, f in sections.items() if flag in sys.argv] or list(sections.values())
    for f in chosen:
        before = os.getloadavg()
        rows = f()
        print(table(rows))
        print(f"load average before/after: {before[0]:.2f} / {os.getloadavg()[0]:.2f}")
        print()


if __name__ == "__main__":
    main()
