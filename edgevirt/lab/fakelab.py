"""A whole labgrid lab on one machine, on 127.0.0.1: for tests and for trying edgevirt.lab.

Real components: ``labgrid-coordinator``, ``labgrid-exporter`` (which runs Debian's
``ser2net`` for each serial port), ``socat`` pty pairs standing in for USB-serial adapters
(one end a link under ``/dev``, which the exporter insists on; the other end the QEMU
board's UART), and :mod:`edgevirt.lab.fakepdu` as the network PDU the exporter publishes
as a ``NetworkPowerPort`` (labgrid's ``simplerest`` model). Each board becomes a place
tagged ``board=<profile>``.

Everything is started in its own process group and stopped on leaving; the ``/dev`` links
carry a per-lab random tag so several labs (and several test runs) never collide.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import yaml

from edgevirt.board import load_board
from edgevirt.console.ser2net import free_port
from edgevirt.errors import SetupError
from edgevirt.lab import LabError

log = logging.getLogger(__name__)


@dataclass
class FakeBoard:
    place: str
    group: str
    device: Path  # the exporter's end, under /dev
    uart: Path  # QEMU's end
    outlet: int


def _tool(name: str, hint: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        raise SetupError(f"{name} not found", hint=hint)
    return found


class FakeLab:
    """``with FakeLab(workdir, boards=2) as lab:`` → ``lab.address``, ``lab.boards``."""

    def __init__(
        self,
        workdir: Path,
        *,
        boards: int = 1,
        board: str = "qemu-virt",
        image_dir: Path | None = None,
        prefix: str = "ev",
    ) -> None:
        self.workdir = workdir.resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.board = board  # a profile name or file
        self.board_name = load_board(board).name
        self.image_dir = image_dir
        self.tag = f"{prefix}{secrets.token_hex(3)}"
        self.exporter_name = f"lab-{self.tag}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.boards = [
            FakeBoard(
                place=f"{self.tag}-{i}",
                group=f"board{i}",
                device=Path(f"/dev/ttyEV{self.tag}{i}"),
                uart=self.workdir / f"uart{i}",
                outlet=i,
            )
            for i in range(boards)
        ]
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = dict(os.environ, GRPC_ENABLE_FORK_SUPPORT="0")
        self.pdu_url = ""

    # -- processes ------------------------------------------------------------------------

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        logf = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child
        p = subprocess.Popen(
            cmd,
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        logf.close()
        self.procs[name] = p
        return p

    def log_tail(self, name: str, n: int = 2000) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")[-n:]

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Stop one component (``coordinator``, ``exporter``, ``pdu``, ``socat-<i>``)."""
        p = self.procs.get(name)
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, sig)
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        except ProcessLookupError:
            pass

    def _wait(self, what: str, ok: object, timeout: float, proc: str) -> None:
        deadline = time.monotonic() + timeout
        while not ok():  # type: ignore[operator]
            p = self.procs[proc]
            if p.poll() is not None:
                raise LabError(f"fake lab: {proc} exited ({p.returncode}): {self.log_tail(proc)}")
            if time.monotonic() > deadline:
                raise LabError(
                    f"fake lab: {what} not ready in {timeout:.0f}s: {self.log_tail(proc)}"
                )
            time.sleep(0.1)

    # -- assembly -------------------------------------------------------------------------

    def __enter__(self) -> FakeLab:
        try:
            self._up()
        except BaseException:
            self.close()
            raise
        return self

    def _up(self) -> None:
        socat = _tool("socat", "apt-get install socat")
        lg = "pip install 'edgevirt[labgrid]'"
        coordinator = _tool("labgrid-coordinator", lg)
        exporter = _tool("labgrid-exporter", lg)
        client = _tool("labgrid-client", lg)
        for b in self.boards:
            self._start(
                f"socat-{b.outlet}",
                [
                    socat,
                    f"PTY,link={b.device},raw,echo=0",
                    f"PTY,link={b.uart},raw,echo=0",
                ],
            )
        for b in self.boards:
            self._wait(
                f"pty pair {b.device}",
                lambda b=b: b.device.exists() and b.uart.exists(),
                10,
                f"socat-{b.outlet}",
            )
        pdu = [
            sys.executable,
            "-m",
            "edgevirt.lab.fakepdu",
            "--board",
            self.board,
            "--build",
            str(self.workdir / "pdu"),
        ]
        pdu += [f"--outlet={b.outlet}={b.uart}" for b in self.boards]
        if self.image_dir is not None:
            pdu += ["--image", str(self.image_dir)]
        self._start("pdu", pdu)
        self._start("coordinator", [coordinator, "--listen", self.address])
        self._wait("fake PDU", lambda: "ready " in self.log_tail("pdu", 10**6), 300, "pdu")
        self.pdu_url = self.log_tail("pdu", 10**6).split("ready ", 1)[1].split()[0]
        exports = {
            b.group: {
                "RawSerialPort": {"port": str(b.device), "speed": 115200},
                "NetworkPowerPort": {
                    "model": "simplerest",
                    "host": self.pdu_url,
                    "index": b.outlet,
                },
            }
            for b in self.boards
        }
        (self.workdir / "exports.yaml").write_text(yaml.safe_dump(exports))
        self._start(
            "exporter",
            [
                exporter,
                "-c",
                self.address,
                "--name",
                self.exporter_name,
                "--hostname",
                "127.0.0.1",
                str(self.workdir / "exports.yaml"),
            ],
        )
        self._wait(
            "exporter", lambda: "Exporter ready" in self.log_tail("exporter", 10**6), 60, "exporter"
        )
        for b in self.boards:
            for args in (
                ["create"],
                ["add-match", f"{self.exporter_name}/{b.group}/*"],
                ["set-tags", f"board={self.board_name}", f"lab={self.tag}"],
            ):
                r = subprocess.run(
                    [client, "-x", self.address, "-p", b.place, *args],
                    capture_output=True,
                    text=True,
                    env=self.env,
                    timeout=60,
                )
                if r.returncode:
                    raise LabError(f"fake lab: labgrid-client {' '.join(args)}: {r.stderr}")

    def close(self) -> None:
        for name in ["exporter", "coordinator", "pdu", *[f"socat-{b.outlet}" for b in self.boards]]:
            self.stop(name)
        for b in self.boards:
            if b.device.is_symlink():
                b.device.unlink()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def main() -> int:
    """``python -m edgevirt.lab.fakelab [--boards N] [--dir D]``: run a lab until Ctrl-C."""
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(
        prog="python -m edgevirt.lab.fakelab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--boards", type=int, default=1)
    ap.add_argument("--board", default="qemu-virt")
    ap.add_argument("--dir", type=Path, default=None, help="work dir [default: a temp dir]")
    args = ap.parse_args()
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="edgevirt-lab-"))
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with FakeLab(workdir, boards=args.boards, board=args.board) as lab:
            print(f"coordinator {lab.address}  (export LG_COORDINATOR={lab.address})")
            for b in lab.boards:
                print(f"place {b.place}: {b.device} ↔ {b.uart}, outlet {b.outlet}")
            print(f"logs in {workdir}; Ctrl-C stops the lab", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    except (LabError, SetupError) as e:
        print(f"fakelab: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
