"""Child processes of a deploy that report through a JSON file they rewrite.

:class:`BackendProcess` is the back-end on the host, for either transport: ``edgevirt
backend run`` (vhost-user sockets, one per device) or the virtio-msg bus (the ivshmem
server QEMU connects to; it maps the carve-out file). The service VM's host side
(:mod:`edgevirt.servicevm.hypervisor`) is watched the same way. Each runs in its own
session, so stopping it stops everything it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from edgevirt.deploy.qemu import log_tail
from edgevirt.errors import BackendError, EdgevirtError


def backend_socket(socket_dir: Path, index: int, name: str) -> Path:
    """Socket naming shared by `backend run --socket-dir` and its launchers."""
    return socket_dir / f"{index}-{name}.sock"


@dataclass(frozen=True)
class IvshmemBus:
    """What the virtio-msg back-end needs besides its devices: the ivshmem server socket
    QEMU connects to, and the carve-out file with its guest-physical base."""

    socket: Path
    carveout_file: Path
    carveout_base: int


class WatchedProcess:
    """A child in its own session that announces itself by writing ``state_path``."""

    what = "process"
    error: type[EdgevirtError] = BackendError

    def __init__(self, argv: list[str], state_path: Path, log_path: Path) -> None:
        self.stats_path = state_path
        self.log_path = log_path
        state_path.unlink(missing_ok=True)
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _tail(self, n: int = 5) -> str:
        self._log.flush()
        return log_tail(self.log_path, n)

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.stats_path.exists():
            self.check_alive()
            if time.monotonic() >= deadline:
                raise self.error(
                    f"{self.what} did not start within {timeout:.0f}s; see {self.log_path}"
                )
            time.sleep(0.05)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise self.error(
                f"{self.what} exited with status {self.proc.returncode}: {self._tail()}"
            )

    def stats(self) -> dict:
        """The last state the process wrote ({} before the first or if unreadable)."""
        try:
            return dict(json.loads(self.stats_path.read_text()))
        except (OSError, ValueError):
            return {}

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM to the whole session, SIGKILL after ``timeout``; idempotent."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class BackendProcess(WatchedProcess):
    """The edgevirt back-end on the host, observed through its stats file.

    vhost-user (``msg`` None): ``edgevirt backend run`` with one socket per device in
    ``socket_dir``. virtio-msg (``msg`` given): the bus as ivshmem server on ``msg.socket``.
    """

    what = "back-end"

    def __init__(
        self,
        devices: list[str],
        socket_dir: Path | None,
        stats: Path,
        log_path: Path,
        *,
        msg: IvshmemBus | None = None,
    ) -> None:
        if msg is None:
            if socket_dir is None:
                raise BackendError("a vhost-user back-end needs a socket directory")
            argv = [sys.executable, "-m", "edgevirt", "backend", "run",
                    "--socket-dir", str(socket_dir)]  # fmt: skip
        else:
            self.what = "virtio-msg back-end"
            argv = [sys.executable, "-m", "edgevirt.backend.transport.virtio_msg",
                    "--socket", str(msg.socket), "--carveout-file", str(msg.carveout_file),
                    "--carveout-base", hex(msg.carveout_base)]  # fmt: skip
        argv += ["--stats", str(stats), "--log-level", "info"]
        for d in devices:
            argv += ["--device", d]
        super().__init__(argv, stats, log_path)

    def check_healthy(self) -> None:
        """Raise as soon as the back-end has refused a queue: the guest would only hang."""
        self.check_alive()
        for dev in self.stats().get("devices", []):
            if dev.get("broken"):
                raise BackendError("back-end refused the guest: " + "; ".join(dev["broken"]))
