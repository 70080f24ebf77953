"""Short, bounded, seeded runs of the atheris targets in fuzz/ (the long run: fuzz/README.md)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "target, runs, max_len",
    [("fuzz_ring.py", 3000, 4096), ("fuzz_vhost_user.py", 20000, 600)],
)
def test_fuzz_target_bounded_run(tmp_path, target, runs, max_len):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / target), f"-runs={runs}", f"-max_len={max_len}",
         "-seed=1", f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Done {runs} runs" in r.stderr
    assert not list(tmp_path.glob("crash-*"))


def test_fuzz_ring_target_catches_a_divergence(monkeypatch):
    """The differential check can fail: a Python ring that drops the head rule is caught."""
    sys.path.insert(0, str(ROOT / "fuzz"))
    try:
        import fuzz_ring
    finally:
        sys.path.remove(str(ROOT / "fuzz"))
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
