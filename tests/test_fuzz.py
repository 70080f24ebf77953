"""Short, bounded, seeded runs of the atheris targets in fuzz/ (the long run: fuzz/README.md)."""

import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("atheris")

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def fuzz(tmp_path: Path, script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), *args, "-seed=1", f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path,
    )  # fmt: skip


def target(name: str) -> ModuleType:
    sys.path.insert(0, str(ROOT / "fuzz"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "fuzz"))


@pytest.mark.parametrize(
    "name, runs, max_len",
    [("fuzz_ring.py", 3000, 4096), ("fuzz_vhost_user.py", 20000, 600),
     ("fuzz_virtio_msg.py", 5000, 2112), ("fuzz_blk.py", 3000, 16387)],
)  # fmt: skip
def test_fuzz_target_bounded_run(tmp_path, name, runs, max_len):
    script = ROOT / "fuzz" / name
    corpus = []
    if name in ("fuzz_virtio_msg.py", "fuzz_blk.py"):  # seeded with valid input (README)
        r = subprocess.run([sys.executable, str(script), "--make-corpus", str(tmp_path / "c")],
                           capture_output=True, text=True, timeout=60, env=ENV)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        corpus = [str(tmp_path / "c")]
    r = fuzz(tmp_path, script, *corpus, f"-runs={runs}", f"-max_len={max_len}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Done {runs} runs" in r.stderr
    assert not list(tmp_path.glob("crash-*"))


def test_fuzz_ring_target_catches_a_divergence(monkeypatch):
    """The differential check can fail: a Python ring that drops the head rule is caught."""
    fuzz_ring = target("fuzz_ring")
    from edgevirt.backend.virtq import IMPLEMENTATIONS, pyring

    if "c" not in IMPLEMENTATIONS:
        pytest.skip("C ring not built")

    class Lax(pyring.SplitQueue):
        __slots__ = ()

        def pop(self, mem, max_chains=0):
            return []

    monkeypatch.setitem(IMPLEMENTATIONS, "python", Lax)
    data = bytearray(256)
    data[0] = 3  # queue size 8: desc table at +0, avail ring at +128
    data[130] = 1  # avail idx 1: the C ring takes (or refuses) a chain, Lax sees none
    with pytest.raises(AssertionError, match="differ"):
        fuzz_ring.TestOneInput(bytes(data))


def test_fuzz_blk_seeds_serve_requests_and_a_lost_completion_is_caught(tmp_path, monkeypatch):
    """The seeds reach the request path (reads, writes, flushes, get_id), and the target
    fails when a reap leaves requests in flight."""
    fuzz_blk = target("fuzz_blk")
    fuzz_blk.make_corpus(str(tmp_path))
    seeds = [p.read_bytes() for p in sorted(tmp_path.iterdir())]
    outcomes = []
    real = fuzz_blk.feedback
    monkeypatch.setattr(fuzz_blk, "feedback", lambda res, err: outcomes.append(real(res, err)))
    for data in seeds:
        fuzz_blk.TestOneInput(data)
    assert any(n & 1 for n in outcomes) and any(n & 2 for n in outcomes), outcomes

    real_aio = fuzz_blk.BlkAio

    class LosesCompletions:  # BlkAio whose full reap returns before the I/O ended
        def __init__(self, *a, **kw):
            self._aio = real_aio(*a, **kw)

        def __getattr__(self, name):
            return getattr(self._aio, name)

        def reap(self, q, inflight=None, wait=False):
            return self._aio.reap(q, inflight, False)

    monkeypatch.setattr(fuzz_blk, "BlkAio", LosesCompletions)
    caught = 0
    for data in seeds:
        try:
            fuzz_blk.TestOneInput(data)
        except AssertionError as e:
            caught += "in flight after a full reap" in str(e)
    assert caught


def test_fuzz_virtio_msg_seeds_reach_driver_ok_cleanly():
    """The seed corpus is what a correct driver sends: no message discarded, device 0 live."""
    f = target("fuzz_virtio_msg")
    errors = f._bus.stats.protocol_errors
    f.TestOneInput(f.seeds()["bring-up"])
    f.TestOneInput(f.seeds()["devices"])
    assert f._bus.stats.protocol_errors == errors
    assert f._bus.devices[0].status == 15  # ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK


def test_fuzz_virtio_msg_catches_a_round_trip_divergence(monkeypatch):
    """An encoder that loses a field (here: the token) is caught on the first valid seed."""
    f = target("fuzz_virtio_msg")
    seed = f.seeds()["queries"]  # encoded before the planted bug
    real = f.p.encode

    def lossy(msg, max_size=f.p.MAX_MSG_SIZE):
        raw = bytearray(real(msg, max_size))
        raw[4:6] = b"\0\0"
        return bytes(raw)

    monkeypatch.setattr(f.p, "encode", lossy)
    with pytest.raises(AssertionError):
        f.TestOneInput(seed)


def test_fuzz_virtio_msg_catches_a_decoder_that_lets_a_bad_id_through(tmp_path, monkeypatch):
    """A decoder that forgets the unknown-ID check (a KeyError instead of VirtioMsgError) is a
    crash the fuzzer finds and saves within a short unseeded run; in-process too, while the
    real decoder refuses the same input cleanly."""
    f = target("fuzz_virtio_msg")
    unknown = bytes([0, 0x7E, 0, 0, 1, 0, 8, 0]).ljust(f.SLOT_SIZE, b"\0")  # transport ID 0x7e
    f.TestOneInput(unknown)  # contained: discarded and counted

    def lax(bus, msg_id, response, what):
        return f.p.LAYOUTS[(bus, msg_id, response)]  # planted: no unknown/reserved ID check

    monkeypatch.setattr(f.p, "_layout", lax)
    with pytest.raises(KeyError):
        f.TestOneInput(unknown)
    planted = tmp_path / "planted.py"
    planted.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT / 'fuzz')!r})\n"
        "import fuzz_virtio_msg as f\n"
        "f.p._layout = lambda bus, msg_id, response, what: f.p.LAYOUTS[(bus, msg_id, response)]\n"
        "f.main()\n"
    )
    r = fuzz(tmp_path, planted, "-runs=20000", "-max_len=2112")
    assert r.returncode != 0 and "KeyError" in r.stdout + r.stderr, r.stderr[-3000:]
    assert list(tmp_path.glob("crash-*"))
