"""`edgevirt backend run` as a child process of a deploy, observed through its stats file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from edgevirt.errors import BackendError


def backend_socket(socket_dir: Path, index: int, name: str) -> Path:
    """Socket naming shared by `backend run --socket-dir` and its launchers."""
    return socket_dir / f"{index}-{name}.sock"


class BackendProcess:
    """`edgevirt backend run` as a child process, observed through its stats file."""

    def __init__(self, devices: list[str], socket_dir: Path, stats: Path, log_path: Path) -> None:
        self.stats_path = stats
        stats.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "edgevirt",
            "backend",
            "run",
            "--socket-dir",
            str(socket_dir),
            "--stats",
            str(stats),
            "--log-level",
            "info",
        ]
        for d in devices:
            cmd += ["--device", d]
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.log_path = log_path
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.stats_path.exists():
            self.check_alive()
            if time.monotonic() >= deadline:
                raise BackendError(
                    f"back-end did not start within {timeout:.0f}s; see {self.log_path}"
                )
            time.sleep(0.05)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            self._log.flush()
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise BackendError(
                f"back-end exited with status {self.proc.returncode}: " + " | ".join(tail)
            )

    def stats(self) -> dict:
        try:
            return json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return {}

    def check_healthy(self) -> None:
        """Raise as soon as the back-end has refused a queue: the guest would only hang."""
        self.check_alive()
        for dev in self.stats().get("devices", []):
            if dev.get("broken"):
                raise BackendError("back-end refused the guest: " + "; ".join(dev["broken"]))

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
