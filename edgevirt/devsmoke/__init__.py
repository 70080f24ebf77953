"""In-guest smoke checks of the devices beyond blk and rng, one module per device.

`edgevirt up` runs a device's checks when the system spec has that device. A
:class:`DeviceSmoke` owns the far side of its device for one run, wherever the back-end
runs:

* **host back-end** — a TAP in a network namespace, unix sockets, a simulated bank's
  control socket on the host: the smoke names the back-end's ``--device`` argument and
  QEMU's vhost-user front-end, prepares and cleans up what the back-end connects to;
* **back-end in the service VM** — the service VM's own network stack, unix sockets and
  kernel peripherals (gpio-sim, i2c-stub) inside it: the smoke names the device string of
  the service VM's back-end and the peripherals it makes, and drives its side through the
  service VM's console (:meth:`DeviceSmoke.attach_service`).

Either way it runs its checks on the guest's console. Devices are peers: a new one adds a
module and a line in :data:`SMOKES`.
"""

from __future__ import annotations

import importlib
import shlex
import subprocess
import sys
import threading
from pathlib import Path

from edgevirt.console.expect import CommandResult, Console
from edgevirt.errors import DeployError
from edgevirt.smoke import Check

#: Device type → "module:class" of its smoke checks.
SMOKES = {
    "net": "edgevirt.devsmoke.net:NetSmoke",
    "vsock": "edgevirt.devsmoke.vsock:VsockSmoke",
    "console": "edgevirt.devsmoke.console:ConsoleSmoke",
    "gpio": "edgevirt.devsmoke.gpio:GpioSmoke",
    "i2c": "edgevirt.devsmoke.i2c:I2cSmoke",
}
#: Where the service VM's back-end keeps the unix sockets of its devices.
SERVICE_RUN = "/run/edgevirt"
#: Ctrl-Cs that stop a far end on the service VM's shell, and the seconds between them.
INTERRUPTS, INTERRUPT_WAIT = 10, 2.0


class DeviceSmoke:
    """One device's host side and in-guest checks for one run of `edgevirt up`."""

    type = "?"
    #: QEMU 7.2's vhost-user front-end on virtio-mmio; None: QEMU 7.2 has none (virtio-msg
    #: only).
    qemu_kind: str | None = "?"
    qemu_options: dict[str, str] = {}

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / f"{self.type}-smoke"
        self.dir.mkdir(parents=True, exist_ok=True)
        #: The service VM's console once its back-end runs (None: the back-end is on the host).
        self.service: Console | None = None
        #: The back-end runs in a service VM (set before it boots): no host far side.
        self.in_service_vm = False

    def backend_arg(self) -> str:
        """The host back-end's ``--device`` argument."""
        raise NotImplementedError

    def service_arg(self) -> str:
        """The device string of the back-end in the service VM (its peer configuration)."""
        raise NotImplementedError

    def service_peripherals(self) -> dict:
        """Kernel peripherals the service VM makes for this device before its back-end opens
        it (``peripherals`` of :class:`edgevirt.servicevm.peer.PeerConfig`)."""
        return {}

    def attach_service(self, console: Console) -> None:
        """The service VM booted and its back-end runs: its side is driven on ``console``."""
        self.service = console
        self.service_ready()

    def service_ready(self) -> None:
        """Finish the service VM's side once its back-end runs (e.g. address its TAP)."""

    def before_backend(self) -> None:
        """Create what the back-end connects to (before it starts)."""

    def after_backend(self) -> None:
        """Finish the host side once the back-end runs (e.g. address its TAP)."""

    def run(self, console: Console, prefix: str = "") -> list[Check]:
        raise NotImplementedError

    def checks(self, console: Console, prefix: str = "") -> list[Check]:
        """:meth:`run`, or one failed check when the service VM that should drive the far
        side is not there (a fault scenario, a service VM that died)."""
        if self.in_service_vm and self.service is None:
            return [Check(f"{prefix}{self.type} checks", False,
                          "no service VM runs the far side of this device")]  # fmt: skip
        return self.run(console, prefix)

    def close(self) -> None:
        """Remove what :meth:`before_backend` created (always called)."""


def supported() -> list[str]:
    return list(SMOKES)


def device_smoke(dtype: str, workdir: Path) -> DeviceSmoke | None:
    """The smoke checks of device type ``dtype``, or None for blk/rng (the suite's own)."""
    ref = SMOKES.get(dtype)
    if ref is None:
        return None
    mod, cls = ref.split(":")
    smoke: DeviceSmoke = getattr(importlib.import_module(mod), cls)(workdir)
    return smoke


def service_python(src: str, *args: object) -> str:
    """A shell command running Python source ``src`` with ``args`` in the service VM (its
    rootfs has Debian's python3); hex-encoded so no shell quoting can break it."""
    argv = "".join(f" {a}" for a in args)
    return f"python3 -c \"exec(bytes.fromhex('{src.encode().hex()}'))\"{argv}"


class Background:
    """``console.run(command)`` in a thread, for a program on one VM while the other VM's
    console drives the opposite end."""

    def __init__(self, console: Console, command: str, timeout: float) -> None:
        self.console = console
        self.result: CommandResult | None = None
        self.error: BaseException | None = None
        self._t = threading.Thread(target=self._run, args=(console, command, timeout),
                                   daemon=True)  # fmt: skip
        self._t.start()

    def _run(self, console: Console, command: str, timeout: float) -> None:
        try:
            self.result = console.run(command, timeout)
        except Exception as e:  # handed to the caller by wait()
            self.error = e

    def join(self, timeout: float) -> None:
        self._t.join(timeout)

    def wait(self, timeout: float) -> CommandResult:
        self._t.join(timeout)
        if self.error is not None:
            raise self.error
        if self.result is None:
            raise DeployError(f"service VM command still running after {timeout:.0f}s")
        return self.result


class FarEnd:
    """One :mod:`edgevirt.devpeer` program on the device's far side while the guest drives
    its end: a host process (``wrap``: e.g. entering a network namespace) when the back-end
    runs on the host, a command on the service VM's console when it runs there.

    The program may not listen yet when the guest connects (Python starts slowly in a
    service VM under TCG): the guest's side retries.

    On the service VM's shell the program runs in a subshell that turns Ctrl-C into a
    normal ``exit 130``: an interactive ash whose job dies of SIGINT drops the rest of the
    command line, with it the end marker the console waits for (this happens when Ctrl-C
    lands before Python has its handler; :mod:`edgevirt.devpeer` itself exits 130).
    """

    def __init__(self, smoke: DeviceSmoke, *args: object, timeout: float = 240.0,
                 wrap: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.timeout = timeout
        argv = ["-m", "edgevirt.devpeer", "--timeout", str(int(timeout)), *map(str, args)]
        self.proc: subprocess.Popen[str] | None = None
        self.bg: Background | None = None
        if smoke.service is not None:
            cmd = " ".join(shlex.quote(a) for a in ["python3", *argv])
            self.bg = Background(smoke.service, f"( trap 'exit 130' INT; {cmd} )", timeout + 30)
        else:
            self.proc = subprocess.Popen(
                [*wrap, sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip

    def output(self) -> str:
        """What the program printed (stderr after stdout on the host), once it ended."""
        if self.bg is not None:
            return self.bg.wait(self.timeout + 60).output
        assert self.proc is not None
        try:
            out, err = self.proc.communicate(timeout=self.timeout + 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        return out + err

    def close(self) -> None:
        """Stop the program if it still runs (a check gave up early)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        # Ctrl-C again until the command ends: one that lands before Python starts only
        # arms the subshell's trap.
        for _ in range(INTERRUPTS):
            if self.bg is None or self.bg.result is not None or self.bg.error is not None:
                break
            self.bg.console.send("\x03")
            self.bg.join(INTERRUPT_WAIT)
