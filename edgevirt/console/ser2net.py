"""Run Debian's ser2net to export a console over RFC2217 (telnet COM-port control).

Labs put ser2net in front of their boards' UARTs; edgevirt uses the same daemon to
export a QEMU console (a unix socket, or a serial device) on loopback, so the remote
path (``rfc2217://host:port``) is exercised with the real thing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from edgevirt.errors import ConsoleError, SetupError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Ser2net:
    """``connector`` is a gensio string: ``unix,/path/console.sock`` or
    ``serialdev,/dev/ttyUSB0,115200n81,local``."""

    def __init__(self, connector: str, workdir: Path, port: int | None = None) -> None:
        binary = shutil.which("ser2net") or "/usr/sbin/ser2net"
        if not Path(binary).exists():
            raise SetupError("ser2net not found", hint="apt-get install ser2net")
        self.port = port or free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / f"ser2net-{self.port}.yaml"
        self.config.write_text(
            "connection: &ev\n"
            f"  accepter: telnet(rfc2217),tcp,127.0.0.1,{self.port}\n"
            f"  connector: {connector}\n"
            "  options:\n"
            "    kickolduser: true\n"
        )
        self.log_path = workdir / f"ser2net-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        # -n: stay in the foreground (we own its lifetime); -d: log to stderr, not syslog;
        # -P: its own pid file, never the system's.
        self.proc = subprocess.Popen(
            [binary, "-n", "-d", "-c", str(self.config), "-P", str(workdir / "ser2net.pid")],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_listening()

    @property
    def url(self) -> str:
        # ser2net does not answer SET_CONTROL (RTS/DTR) for a pty; pyserial would wait.
        return f"rfc2217://127.0.0.1:{self.port}?ign_set_control"

    def _wait_listening(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.flush()
                raise ConsoleError(
                    f"ser2net exited ({self.proc.returncode}): "
                    + self.log_path.read_text(errors="replace")[-500:]
                )
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        self.stop()
        raise ConsoleError(f"ser2net did not listen on 127.0.0.1:{self.port} in {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> Ser2net:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
