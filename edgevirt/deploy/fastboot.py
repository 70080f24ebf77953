"""The fastboot boot chain: an Android boot image through the board's own bootloader.

Qualcomm boards (SA8155P ADP …) boot PBL → XBL → ABL, a UEFI application that boots the
``boot`` partition or, in fastboot mode, what ``fastboot boot`` sends it. edgevirt builds the
Android boot image (kernel + initramfs + composed DTB + command line,
:mod:`edgevirt.image.bootimg`) and hands it to Debian's ``fastboot`` client: ``boot`` (RAM
only, nothing written: the default) or ``flash`` (``flash boot`` then ``reboot``). Power and
console are the board's, as for U-Boot boards.

Profile section (``[fastboot]``, from ``Board.raw``)::

    serial = "tcp:192.168.1.20:5554"   # fastboot -s: a USB serial number or tcp:host:port
                                       # (default: the only device fastboot sees)
    method = "boot" | "flash"
    timeout = 60                       # seconds for one fastboot command
    enter_timeout = 60                 # seconds for the device to show up after power-on
    [fastboot.bootimg]                 # mkbootimg's layout (edgevirt.image.bootimg)
    base = 0x80000000
    page_size = 4096
    header_version = 2
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevirt.board import Board, check_keys, get_key
from edgevirt.console.expect import Console
from edgevirt.deploy.power import Power
from edgevirt.deploy.strategy import BootStrategy, State
from edgevirt.errors import ConfigError, DeployError, SetupError
from edgevirt.image.bootimg import BootImgLayout, write_bootimg

log = logging.getLogger(__name__)

METHODS = ("boot", "flash")


class FastbootError(DeployError):
    """The fastboot client or the device failed; the message quotes the device's answer."""


@dataclass(frozen=True)
class FastbootSettings:
    serial: str | None
    method: str
    timeout: float
    enter_timeout: float
    layout: BootImgLayout


def fastboot_settings(board: Board) -> FastbootSettings:
    w = board.where("fastboot")
    fb: dict[str, Any] = board.raw.get("fastboot", {})
    check_keys(fb, {"serial", "method", "timeout", "enter_timeout", "bootimg"}, w)
    method = get_key(fb, "method", str, w, "boot")
    if method not in METHODS:
        raise ConfigError(f"{w}.method: expected one of {', '.join(METHODS)}, got {method!r}")
    table = get_key(fb, "bootimg", dict, w, {})
    return FastbootSettings(
        serial=get_key(fb, "serial", str, w, None),
        method=method,
        timeout=float(get_key(fb, "timeout", (int, float), w, 60)),
        enter_timeout=float(get_key(fb, "enter_timeout", (int, float), w, 60)),
        layout=BootImgLayout.from_table(table, f"{w}.bootimg"),
    )


class FastbootClient:
    """Debian's ``fastboot`` for one device; every call bounded by a timeout."""

    def __init__(self, serial: str | None, *, binary: str = "fastboot", timeout: float = 60):
        path = shutil.which(binary)
        if path is None:
            raise SetupError(f"{binary} not found", hint="apt-get install fastboot (make setup)")
        self.binary = path
        self.serial = serial
        self.timeout = timeout
        self.device = serial or "the fastboot device"

    def run(self, *args: str, timeout: float | None = None) -> str:
        """Run one fastboot command; its output (fastboot talks on stderr)."""
        cmd = [self.binary, *(["-s", self.serial] if self.serial else []), *args]
        t = timeout or self.timeout
        log.info("fastboot: %s", " ".join(cmd))
        # Own session: a client stuck on a silent device is killed with all it started.
        p = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = p.communicate(timeout=t)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
            raise FastbootError(
                f"fastboot {' '.join(args)}: no answer from {self.device} within {t:.0f}s "
                f"(device silent or hung); client stopped. Output: {_tail(out)}",
                hint="power-cycle the board into fastboot mode and try again",
            ) from None
        m = re.search(r"FAILED \(remote: '(.*)'\)", out)
        if m:
            raise FastbootError(f"fastboot {' '.join(args)}: {self.device} answered FAIL: {m[1]}")
        if p.returncode != 0:
            raise FastbootError(
                f"fastboot {' '.join(args)} failed (exit {p.returncode}): {_tail(out)}"
            )
        return out

    def getvar(self, name: str, timeout: float | None = None) -> str:
        out = self.run("getvar", name, timeout=timeout)
        m = re.search(rf"^{re.escape(name)}: ?(.*)$", out, re.M)
        if m is None:
            raise FastbootError(f"fastboot getvar {name}: no value in {_tail(out)}")
        return m[1].strip()

    def boot(self, image: Path) -> str:
        return self.run("boot", str(image))

    def flash(self, partition: str, image: Path) -> str:
        return self.run("flash", partition, str(image))

    def reboot(self) -> str:
        return self.run("reboot")


def _tail(out: str, n: int = 3) -> str:
    return " | ".join(out.strip().splitlines()[-n:]) or "(nothing)"


def write_boot_image(
    out: Path, kernel: Path, initrd: Path, dtb: Path, cmdline: str, layout: BootImgLayout
) -> Path:
    return write_bootimg(
        out,
        kernel=kernel.read_bytes(),
        ramdisk=initrd.read_bytes(),
        dtb=dtb.read_bytes(),
        cmdline=cmdline,
        layout=layout,
    )


class FastbootStrategy(BootStrategy):
    """off → bootloader (the device answers in fastboot mode) → kernel (boot image sent and
    started) → shell (the guest agent on the console)."""

    name = "fastboot"
    states = (State.OFF, State.BOOTLOADER, State.KERNEL, State.SHELL)

    def __init__(
        self,
        power: Power,
        connect: Callable[[], Console],
        client: FastbootClient,
        settings: FastbootSettings,
        boot_image: Callable[[], Path],
        **kw: float | bytes,
    ) -> None:
        super().__init__(power, connect, **kw)  # type: ignore[arg-type]
        self.client = client
        self.settings = settings
        self.boot_image = boot_image
        #: getvar product of the device that answered.
        self.product: str | None = None

    def _enter_bootloader(self) -> None:
        self._close_console()
        self.power.on()
        deadline = time.monotonic() + self.settings.enter_timeout
        last: FastbootError | None = None
        while time.monotonic() < deadline:
            self.abort()
            try:
                left = deadline - time.monotonic()
                self.product = self.client.getvar("product", timeout=max(1.0, min(10.0, left)))
                return
            except FastbootError as e:
                if "answered FAIL" in str(e):
                    raise  # a device is there and refuses: no point in waiting
                last = e
                time.sleep(1)
        raise FastbootError(
            f"{self.client.device} did not show up in fastboot mode within "
            f"{self.settings.enter_timeout:.0f}s after power-on; last: {last}",
            hint="boot the board into fastboot (ABL: hold volume-down at power-on, or "
            "`adb reboot bootloader`), check the USB cable or [fastboot] serial",
        )

    def _enter_kernel(self) -> None:
        image = self.boot_image()
        # Attach first: the kernel's first lines come right after the device says OKAY.
        self.console = self.connect()
        if self.settings.method == "flash":
            self.client.flash("boot", image)
            self.client.reboot()
        else:
            self.client.boot(image)
