"""What several test files need: run the CLI as a user does, and find leftover processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def edgevirt(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``python -m edgevirt ARGS`` from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "edgevirt", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def flat(text: str) -> str:
    """rich wraps long messages: compare with whitespace collapsed."""
    return " ".join(text.split())


def _is_pytest(line: str) -> bool:
    # Temporary paths contain "pytest-of-…": match the test runner's own command only.
    args = line.split(None, 1)[1] if " " in line.strip() else ""
    return "pytest" in args.split(" ", 2)[0] or " -m pytest" in args


def leftovers(marker: str) -> list[str]:
    """Processes (other than the test runner) whose command line mentions ``marker``."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if marker in ln and not _is_pytest(ln)]
