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


def caught(module: ModuleType, inputs: list[bytes], text: str) -> int:
    """How many of ``inputs`` the target reports with an AssertionError mentioning ``text``."""
    n = 0
    for data in inputs:
        try:
            module.TestOneInput(data)
        except AssertionError as e:
            n += text in str(e)
    return n


def target(name: str) -> ModuleType:
    sys.path.insert(0, str(ROOT / "fuzz"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "fuzz"))


@pytest.mark.parametrize(
    "name, runs, max_len",
    [("fuzz_ring.py", 3000, 4096), ("fuzz_vhost_user.py", 20000, 600),
     ("fuzz_virtio_msg.py", 5000, 2112), ("fuzz_blk.py", 3000, 16387),
     ("fuzz_devices.py", 1000, 2048), ("fuzz_peripherals.py", 2000, 2048)],
)  # fmt: skip
def test_fuzz_target_bounded_run(tmp_path, name, runs, max_len):
    script = ROOT / "fuzz" / name
    corpus = []
    if name in ("fuzz_virtio_msg.py", "fuzz_blk.py"):  # seeded with valid input (README)
        r = subprocess.run([sys.executable, str(script), "--make-corpus", str(tmp_path / "c")],
                           capture_output=True, text=True, timeout=60, env=ENV)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        corpus = [str(tmp_path / "c")]
    # headers need length
    extra = ["-len_control=0"] if name in ("fuzz_devices.py", "fuzz_peripherals.py") else []
    r = fuzz(tmp_path, script, *corpus, f"-runs={runs}", f"-max_len={max_len}", *extra)
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
    assert caught(fuzz_blk, seeds, "in flight after a full reap")


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


# -- parsers of untrusted input (hardening issue): one guard, a few seconds each --------------

PARSER_TARGETS = [
    ("fuzz_fdt.py", 500, 1024),
    ("fuzz_deb.py", 200, 2048),
    ("fuzz_cpio.py", 400, 2048),
    ("fuzz_tftp.py", 1000, 600),
    ("fuzz_ymodem.py", 800, 512),
    ("fuzz_config.py", 300, 1024),
    ("fuzz_msg_ring.py", 800, 256),
    ("fuzz_xen.py", 3000, 1024),
]


@pytest.mark.parametrize("name, runs, max_len", PARSER_TARGETS)
def test_parser_fuzz_target_bounded_run(tmp_path, name, runs, max_len):
    r = fuzz(tmp_path, ROOT / "fuzz" / name, f"-runs={runs}", f"-max_len={max_len}", "-timeout=20")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Done {runs} runs" in r.stderr
    assert not list(tmp_path.glob("crash-*"))


def test_fuzz_guard_catches_foreign_exceptions_hangs_and_escapes(tmp_path):
    guard_mod = target("guard")
    g = guard_mod.Guard(timeout=0.2)
    g.run(lambda out: (out / "inside.txt").write_text("ok"))  # writing inside: fine
    from edgevirt.errors import ConfigError

    def refuse(out):
        raise ConfigError("edgevirt's own error")

    g.run(refuse)  # an allowed exception is the parser doing its job
    with pytest.raises(ValueError):
        g.run(lambda out: int("x"))
    with pytest.raises(AssertionError, match="hang"):
        g.run(lambda out: [None for _ in iter(int, 1)])
    with pytest.raises(AssertionError, match="wrote outside"):
        g.run(lambda out: (tmp_path / "escaped").write_text("x"))
    with pytest.raises(AssertionError, match="wrote outside"):
        g.run(lambda out: (out.parent / "beside").mkdir())


def test_fuzz_deb_target_catches_a_lax_unpacker(monkeypatch):
    """With the '..' rule switched off, the target's guard sees the write leave out/."""
    f = target("fuzz_deb")
    import io
    import tarfile

    from edgevirt.image import unpack

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("./../../escaped")
        ti.size = 1
        tf.addfile(ti, io.BytesIO(b"x"))
    control = f._compress(f._tar_control(), ".gz")
    blob = f._ar([("debian-binary", b"2.0\n"), ("control.tar.gz", control),
                  ("data.tar", buf.getvalue())])  # fmt: skip
    f.guard.run(lambda out: f.check(out, blob))  # the real rules refuse it: no breach
    monkeypatch.setattr(
        unpack, "member_path", lambda name, source="": "/" + name.removeprefix("./")
    )
    with pytest.raises(AssertionError, match="wrote outside"):
        f.guard.run(lambda out: f.check(out, blob))


# Inputs the targets found (atheris crash files), kept as regressions.
FOUND = {
    # overlay node with phandle 0 merged into a base node with a phandle: libfdt 1.7 keeps
    # the base's; edgevirt overwrote it
    "fuzz_fdt": ["ACf7JyQBfjB+MDA="],
    # a /memreserve/ entry of size 0 but address != 0 ends the map for libfdt and dtc
    "fuzz_fdt#2": ["Mb71vtsuvvXbFA=="],
    # a board profile that is not UTF-8: UnicodeDecodeError escaped load_board
    "fuzz_config": ["g/YhLQp0"],
    "fuzz_xen": [
        # a passthrough node naming no region: KeyError out of partial_dt
        "OGUACG0OTDC632NkKsX0HeRisDA3IWfmcyVo9QZGdIbEM7Gw3NauRMMX3jvqbMvQatKo5qiP4dO2vHG7MDNTlUC3"
        "rt3ECzHSiPjXKV2iGLWbblzQJKBJLgGLJrRs8hq+AbOMdw==",
        # a region on memory the base tree reserves (firmware) overlapping a module
        "59kCeyy8zqlUPbHopM+OyUEhKHUyMYFSSffgnxofILjZwWp4O7Y6aqjLt6d5hcLOfCstYDNM/HlEbnNHsyjhSZPF"
        "QEKRIUFpFFS30Xi/HKAAuIk2HR/70OXaRqkJ+nSSRKtVrMRIxS5V0/CnM7W8LU3nirp9jbdtT5nHm6kQecxdoMs4"
        "I+cXPtuVYLw3t/l36uW2xOQkaA861XwvWVVOcPyMm5qBUJGz1v31SRJZwqz/EgP+FfnIBAOX0t++Yu9g4WqO5/XQ"
        "WUE=",
        # modules from a base just above RAM's start placed over Xen's load area
        "n/rowrXKXS2jkehOaKuuCiMyC0HeVUGAqRvxXJGerHdZHCtMgBGVqjCW5UlH+ehYu8mBPvskFuzLTBQ2pPVjHeXV"
        "GoOVAKW5jDofzMqAN5IeFwZQWAkHqZwyHt6BIbd31zwZg1E3AZEnmHWAwXz5OizdD6Dx8hDjStwecnPrhW94zLQW"
        "CUlallnhjhS8zbIGslMQGT9nG7T0CQdyd3PML6F+hpDmH4WIyYvu++eONc09h3A4rakDW5EBishR9wrn6lmq67CS"
        "jZLPfjvX2ePhvd+6FTg6ND0Bq3rTzdfIckUH/Ha2s8UxhDNtrBCH7tNhsyGBFyHFaHjjvNycm9MDE15I01Juo0ze"
        "7hMaxVpa3Hq6cITp8vyikHFE9IYBbHo9DqtUyk5u1n0bL/8PIGRiWgYfm8vS7rbE8SUOf41lyyK5qHP2NcIvU9ko"
        "gkVt/pPWCISsmYQ8M5kJSewh7CvS8+uzHratm7ymtORN1Kd3gx8ZzOUkCpfmSuOTe3A29AdOwVqxtHSXt/XlTwNM"
        "oOR8DA==",
        # a region overlapping the base tree's own /reserved-memory node
        "cjg8it2zeOq64X2ZcbjnO+gBHIX62hFTgAQoYFtEHZGLa/cZ8hU2SrBuMQ40fdAHmk28rO5ejXlQrfvAAZRD6Aj0"
        "zuhYkSOPNXwaLogvcsabo29K8FkNpHnFzX1SKmF7EopOJns5TXTOT8Ana5B+mJhWs26qmK7wVEMyjK7G4V+VrlrM"
        "O6Nq4Pd/ILQzlK1FTbMQCZWHQMMSqPhrXIqT0A5YuZUChAGii7wavr4j19MCFYPubd7RUsORaO8eBJaF7Sd4beWx"
        "0lc=",
    ],
}


@pytest.mark.parametrize("name", sorted(FOUND))
def test_fuzz_found_inputs_stay_fixed(name):
    import base64

    f = target(name.split("#")[0])
    for b64 in FOUND[name]:
        f.TestOneInput(base64.b64decode(b64))


def test_fuzz_xen_target_composes_and_catches_a_wrong_xen_reg(monkeypatch):
    """Inputs reach a written host DTB (the success invariants run), and a composer whose
    partial DTB maps the wrong host page is caught."""
    import random

    f = target("fuzz_xen")
    composed = []
    real = f.xen.compose_xen
    monkeypatch.setattr(f.xen, "compose_xen", lambda *a: composed.append(1) or real(*a))
    rng = random.Random(1)
    inputs = [bytes(rng.getrandbits(8) for _ in range(300)) for _ in range(400)]
    for data in inputs:
        f.TestOneInput(data)
    assert len(composed) > 10, len(composed)

    def shifted(domain, regions):
        moved = {n: f.xen.XenRegion(r.name, r.host + 0x1000, r.size, r.guest, r.domains)
                 for n, r in regions.items()}  # fmt: skip
        return real_partial(domain, moved)

    real_partial = f.xen.partial_dt
    monkeypatch.setattr(f.xen, "partial_dt", shifted)
    assert caught(f, inputs, "xen,reg")


def test_fuzz_fdt_differential_catches_a_divergence(monkeypatch):
    """Without the phandle rule, the first found input is reported as a tree difference."""
    import base64

    f = target("fuzz_fdt")
    from edgevirt.devicetree import overlay

    monkeypatch.setattr(overlay, "_prevent_phandle_overwrite", lambda fdt, fdto: None)
    with pytest.raises(AssertionError, match="trees differ"):
        f.TestOneInput(base64.b64decode(FOUND["fuzz_fdt"][0]))


# -- back-end state machine: vhost-user message sequences against a real process -------------


def test_vhost_user_sequence_fuzzer_bounded_run(tmp_path):
    r = fuzz(tmp_path, ROOT / "fuzz" / "fuzz_vhost_user_seq.py", "-runs=25", "-max_len=512",
             "-timeout=60")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Done 25 runs" in r.stderr
    assert not list(tmp_path.glob("crash-*"))


def test_vhost_user_sequence_generator_reaches_a_served_request():
    """The generator's bring-up speaks the protocol right: a read is served, and the
    back-end's fds return to baseline after the disconnect (what every input checks)."""
    f = target("fuzz_vhost_user_seq")
    try:
        assert f.served_once()
        f.TestOneInput(b"")  # the shortest session: connect, one step, disconnect
    finally:
        f.backend.proc.kill()
        f.backend.proc.wait()


def test_virtio_msg_sequence_fuzzer_bounded_run(tmp_path):
    r = fuzz(tmp_path, ROOT / "fuzz" / "fuzz_virtio_msg_seq.py", "-runs=15", "-max_len=512",
             "-timeout=60")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Done 15 runs" in r.stderr
    assert not list(tmp_path.glob("crash-*"))


def test_virtio_msg_sequence_generator_reaches_a_served_request():
    f = target("fuzz_virtio_msg_seq")
    try:
        assert f.served_once()
        f.TestOneInput(b"")
    finally:
        f.backend.proc.kill()
        f.backend.proc.wait()


def test_sequence_harness_reports_a_back_end_that_dies(monkeypatch):
    """A step after which the back-end is gone is reported as a crash of that input."""
    f = target("fuzz_vhost_user_seq")

    def killer(s, fdp):
        f.backend.proc.kill()
        f.backend.proc.wait()

    monkeypatch.setattr(f, "step", killer)
    try:
        with pytest.raises(AssertionError, match="back-end died"):
            f.TestOneInput(bytes(8))
    finally:
        f.backend.kill()


def test_cpumeter_counts_the_children_a_run_starts(tmp_path):
    """CPU time of a process the measured command starts (a back-end) is counted."""
    import json

    # burns, then stays a while: the meter samples, so what a process did in its last
    # interval before exiting is not counted (an under-count, never an over-count)
    burn = "import time\nx = 0\nfor i in range(4_000_000): x += i\ntime.sleep(1)"
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {burn!r}])"
    cmd = [sys.executable, "-c", child]
    r = subprocess.run([sys.executable, str(ROOT / "fuzz" / "cpumeter.py"), "--interval", "0.05",
                        "--", *cmd], capture_output=True, text=True, timeout=120)  # fmt: skip
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["reason"] == "exited" and out["returncode"] == 0, out
    assert out["processes"] >= 2 and out["cpu_s"] >= 0.1, out
