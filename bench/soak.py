"""Soak: the back-end process under continuous load for minutes, with reconnects, hostile
rings and SIGKILL + restart, checking data and resource use at the end.

One ``edgevirt backend run`` serves blk (the data disk), rng and a second blk (the victim of
hostile rings). A synthetic front-end (:class:`VhostUserFrontend`, rings in a memfd):

- writes 4 KiB blocks with contents derived from (block, generation) and reads random
  earlier blocks back, verifying each against the model, in batches on queue 0;
- reads 64 bytes of rng per batch (non-empty, not all equal);
- reconnects (new connection, new memory and rings) every ``--reconnect`` seconds;
- every ``--hostile`` seconds hands the victim device a ring with a buffer outside the
  memory table and checks that the back-end marks exactly that queue broken (stats file)
  while blk and rng keep serving;
- every ``--kill`` seconds (offset half a period) SIGKILLs the back-end and restarts it;
  acknowledged writes must survive (they are on the disk file);
- samples the back-end's RSS and open-fd count every ``--sample`` seconds.

At the end every block ever written is read back through the back-end and compared with
the model, and with the disk file itself. Reported: requests, bytes, mismatches (must be
0), hostile rings refused / injected (must be equal), restarts, and per back-end
incarnation the RSS and fd-count slopes (least squares, per minute).

    .venv/bin/python bench/soak.py --minutes 10
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgevirt.backend.devices import blk as b  # noqa: E402
from edgevirt.backend.transport.vhost_user.frontend import VhostUserFrontend  # noqa: E402

BLOCK = 4096
DISK_BLOCKS = 4096  # 16 MiB data disk
BATCH = 16
ROOT = Path(__file__).resolve().parent.parent


def pattern(block: int, gen: int) -> bytes:
    seed = hashlib.sha256(f"{block}:{gen}".encode()).digest()
    return (seed * (BLOCK // len(seed) + 1))[:BLOCK]


@dataclass
class Incarnation:
    pid: int
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t, rss, fds)

    def slopes(self) -> dict[str, float]:
        if len(self.samples) < 3:
            return {"samples": len(self.samples)}
        ts = [s[0] / 60 for s in self.samples]
        out: dict[str, float] = {"samples": len(self.samples), "minutes": round(ts[-1] - ts[0], 2)}
        for i, name in ((1, "rss_KiB_per_min"), (2, "fds_per_min")):
            ys = [s[i] / (1024 if i == 1 else 1) for s in self.samples]
            mt, my = sum(ts) / len(ts), sum(ys) / len(ys)
            var = sum((t - mt) ** 2 for t in ts) or 1.0
            out[name] = round(
                sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / var, 2
            )
        out["rss_MiB_first_last"] = f"{self.samples[0][1] >> 20}/{self.samples[-1][1] >> 20}"
        out["fds_first_last"] = f"{self.samples[0][2]}/{self.samples[-1][2]}"
        return out


class Soak:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.disk = work / "disk.img"
        self.victim = work / "victim.img"
        for f in (self.disk, self.victim):
            f.touch()
            os.truncate(f, DISK_BLOCKS * BLOCK)
        self.stats = work / "stats.json"
        self.proc: subprocess.Popen[bytes] | None = None
        self.incarnations: list[Incarnation] = []
        self.model: dict[int, int] = {}  # block -> generation written (acknowledged)
        self.rnd = random.Random(7)
        self.counts = {"writes": 0, "reads": 0, "verified": 0, "mismatches": 0, "rng_reads": 0,
                       "reconnects": 0, "restarts": 0, "hostile_injected": 0,
                       "hostile_refused": 0, "blk_errors": 0}  # fmt: skip
        self.fe: VhostUserFrontend | None = None
        self.rng: VhostUserFrontend | None = None

    # -- the back-end process ------------------------------------------------------------

    def start(self) -> None:
        for s in self.work.glob("*.sock"):
            s.unlink()
        self.stats.unlink(missing_ok=True)
        log = open(self.work / "backend.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgevirt", "backend", "run", "--log-level", "warning",
             "--device", f"blk:path={self.disk}", "--device", "rng",
             "--device", f"blk:path={self.victim}", "--socket-dir", str(self.work),
             "--stats", str(self.stats)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not all((self.work / n).exists() for n in ("0-blk.sock", "1-rng.sock", "2-blk.sock")):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"back-end did not start: see {self.work / 'backend.log'}")
            time.sleep(0.02)
        self.incarnations.append(Incarnation(self.proc.pid))

    def kill(self) -> None:
        assert self.proc is not None
        self.close_frontends()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.counts["restarts"] += 1
        self.start()

    def sample(self, t: float) -> None:
        assert self.proc is not None
        pid = self.proc.pid
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        self.incarnations[-1].samples.append((t, rss, fds))

    def device_stats(self, index: int) -> dict:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                return json.loads(self.stats.read_text())["devices"][index]  # type: ignore[no-any-return]
            except (OSError, ValueError, KeyError, IndexError):
                time.sleep(0.05)
        raise RuntimeError("no stats file from the back-end")

    # -- front-ends -----------------------------------------------------------------------

    def connect(self) -> None:
        self.close_frontends()
        self.fe = VhostUserFrontend(str(self.work / "0-blk.sock"), size=8 << 20, timeout=10)
        self.fe.negotiate()
        self.fe.set_mem_table()
        self.fe.setup_vring(0, 64)
        self.rng = VhostUserFrontend(str(self.work / "1-rng.sock"), size=1 << 20, timeout=10)
        self.rng.negotiate()
        self.rng.set_mem_table()
        self.rng.setup_vring(0, 16)

    def close_frontends(self) -> None:
        for fe in (self.fe, self.rng):
            if fe is not None:
                fe.close()
        self.fe = self.rng = None

    def _request(self, kind: int, block: int, data: bytes | None) -> bytes | None:
        assert self.fe is not None
        vr = self.fe.vrings[0]
        drv = vr.driver
        drv.reset_data()
        hdr = b.REQ_HEADER.pack(kind, 0, block * (BLOCK // 512))
        if data is not None:
            drv.add([hdr, data], [1])
        else:
            drv.add([hdr], [BLOCK, 1])
        self.fe.kick(0)
        deadline = time.monotonic() + 10
        used: list[tuple[int, int]] = []
        while not used:
            used = drv.get_used()
            if not used:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"blk request for block {block} not completed in 10 s")
                self.fe.wait_call(0, 0.05)
        # add() allocated header, data, status in that order from the start of the data area
        data_gpa = _align(drv.data_start + 16, 16)
        status = drv.read(_align(data_gpa + BLOCK, 16), 1)[0]
        if status != 0:
            self.counts["blk_errors"] += 1
            raise RuntimeError(f"blk status {status}")
        return drv.read(data_gpa, BLOCK) if data is None else None

    def write(self, block: int) -> None:
        gen = self.model.get(block, 0) + 1
        self._request(b.T_OUT, block, pattern(block, gen))
        self.model[block] = gen
        self.counts["writes"] += 1

    def verify(self, block: int) -> None:
        got = self._request(b.T_IN, block, None)
        self.counts["reads"] += 1
        want = pattern(block, self.model[block]) if block in self.model else bytes(BLOCK)
        self.counts["verified"] += 1
        if got != want:
            self.counts["mismatches"] += 1

    def rng_read(self) -> None:
        assert self.rng is not None
        drv = self.rng.vrings[0].driver
        drv.reset_data()
        drv.add([], [64])
        self.rng.kick(0)
        deadline = time.monotonic() + 10
        while not (used := drv.get_used()):
            if time.monotonic() > deadline:
                raise RuntimeError("rng request not completed in 10 s")
            self.rng.wait_call(0, 0.05)
        data = drv.read(drv.data_start, used[0][1])
        if not data or len(set(data)) < 8:
            raise RuntimeError(f"rng returned {data!r}")
        self.counts["rng_reads"] += 1

    def hostile(self) -> None:
        """A ring on the victim whose only buffer lies outside the memory table."""
        before = len(self.device_stats(2)["broken"])
        fe = VhostUserFrontend(str(self.work / "2-blk.sock"), size=1 << 20, timeout=10)
        try:
            fe.negotiate()
            fe.set_mem_table()
            drv = fe.setup_vring(0, 16).driver
            outside = fe.region.gpa + fe.region.size + 0x100000
            drv.write_desc(0, drv.alloc(16, b.REQ_HEADER.pack(b.T_IN, 0, 0)), 16, 1, 1)
            drv.write_desc(1, outside, BLOCK, 2, 0)  # WRITE, outside the carve-out
            drv.write_avail_entry(0, 0)
            drv.set_avail_idx(1)
            fe.kick(0)
            self.counts["hostile_injected"] += 1
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if len(self.device_stats(2)["broken"]) > before:
                    self.counts["hostile_refused"] += 1
                    break
                time.sleep(0.05)
        finally:
            fe.close()

    # -- the run --------------------------------------------------------------------------

    def run(self, seconds: float, reconnect: float, hostile: float, kill: float,
            sample: float) -> dict:  # fmt: skip
        self.start()
        self.connect()
        t0 = time.monotonic()
        next_reconnect, next_hostile = reconnect, hostile
        next_kill, next_sample = kill / 2, 0.0
        while (t := time.monotonic() - t0) < seconds:
            for _ in range(BATCH):
                if self.rnd.random() < 0.6 or not self.model:
                    self.write(self.rnd.randrange(DISK_BLOCKS))
                else:
                    self.verify(self.rnd.choice(list(self.model)))
            self.rng_read()
            if t >= next_sample:
                self.sample(t)
                next_sample += sample
            if t >= next_reconnect:
                self.connect()
                self.counts["reconnects"] += 1
                next_reconnect += reconnect
            if t >= next_hostile:
                self.hostile()
                next_hostile += hostile
            if t >= next_kill:
                self.kill()
                self.connect()
                next_kill += kill
        # every block ever written, through the back-end and in the file
        self.connect()
        for block in sorted(self.model):
            self.verify(block)
        raw = self.disk.read_bytes()
        file_mismatches = sum(
            raw[k * BLOCK : (k + 1) * BLOCK] != pattern(k, g) for k, g in self.model.items()
        )
        self.close_frontends()
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(10)
        return {
            "seconds": round(time.monotonic() - t0, 1),
            **self.counts,
            "blocks_written_distinct": len(self.model),
            "file_mismatches": file_mismatches,
            "incarnations": [i.slopes() for i in self.incarnations],
        }


def _align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--reconnect", type=float, default=5, help="seconds between reconnects")
    ap.add_argument("--hostile", type=float, default=60, help="seconds between hostile rings")
    ap.add_argument("--kill", type=float, default=120, help="seconds between SIGKILLs")
    ap.add_argument("--sample", type=float, default=5, help="seconds between RSS/fd samples")
    ap.add_argument("--keep", type=Path, help="keep the work directory here")
    a = ap.parse_args()
    work = a.keep or Path(tempfile.mkdtemp(prefix="edgevirt-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    result = Soak(work).run(a.minutes * 60, a.reconnect, a.hostile, a.kill, a.sample)
    print(json.dumps(result, indent=2))
    ok = (result["mismatches"] == 0 and result["file_mismatches"] == 0
          and result["hostile_refused"] == result["hostile_injected"])  # fmt: skip
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
