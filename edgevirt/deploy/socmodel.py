"""A QEMU model of a real SoC board, running that board's own firmware: power for a stand-in.

``[power] kind = "qemu-model"`` makes a real board's profile usable without the board:
QEMU's model of the SoC (``-M raspi3b``) runs the board's own U-Boot binary, so the
console, prompt, load addresses and device tree are the board's, not QEMU ``virt``'s. The
rest of the profile (console quirks, U-Boot addresses, boot chain) is the same as for the
real board; only power and the console's URL come from here.

Schema (``[power]``, read from ``Board.raw``)::

    kind = "qemu-model"
    machine = "raspi3b"                 # QEMU -M
    firmware = "/usr/lib/u-boot/rpi_3/u-boot.bin"   # what the model starts (-kernel)
    serial = 1                          # which serial port is the board's console
    accel = "tcg,thread=single"         # QEMU -accel (default: QEMU's)
    binary = "qemu-system-aarch64"

An SD card image (``sd_card``) is attached as ``-drive if=sd``; without one the model has
no card and U-Boot falls through to its prompt (images then come over the console).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from edgevirt.board import Board, get_key
from edgevirt.deploy.power import Power
from edgevirt.deploy.qemu import QemuProcess, check_binary, wait_for_path
from edgevirt.deploy.qemucmd import qemu_base
from edgevirt.errors import ConfigError, SetupError

log = logging.getLogger(__name__)

#: Packages that ship the firmware paths profiles name (for the hint of a missing file).
FIRMWARE_PACKAGES = {"/usr/lib/u-boot/rpi_": "u-boot-rpi:arm64"}


class QemuModel(Power):
    """QEMU's model of the board; ``on`` starts it paused on a console socket that waits."""

    def __init__(self, board: Board, build: Path, power: dict[str, Any]) -> None:
        w = board.where("power")
        self.board = board
        self.build = build
        self.machine = get_key(power, "machine", str, w)
        self.binary = get_key(power, "binary", str, w, "qemu-system-aarch64")
        self.firmware = Path(get_key(power, "firmware", str, w))
        self.serial = get_key(power, "serial", int, w, 0)
        self.accel = get_key(power, "accel", str, w, "")
        if not 0 <= self.serial <= 3:
            raise ConfigError(f"{w}.serial: expected a serial port index 0-3, got {self.serial}")
        if not self.firmware.is_file():
            fw = str(self.firmware)
            pkg = next((p for k, p in FIRMWARE_PACKAGES.items() if fw.startswith(k)), None)
            raise SetupError(
                f"{w}.firmware: {self.firmware} not found",
                hint=f"apt-get install {pkg}" if pkg else "install the board's firmware",
            )
        #: Attached as the model's SD card at the next power-on (None: no card).
        self.sd_card: Path | None = None
        self.qemu: QemuProcess | None = None
        self.boots = 0

    @property
    def console_socket(self) -> Path:
        return self.build / "console.sock"

    @property
    def console_url(self) -> str:
        return f"unix://{self.console_socket}"

    def command(self) -> list[str]:
        # The serial ports before the board's console go nowhere; the console is a socket
        # server that waits for us, so no early output is lost.
        serials: list[str] = []
        for _ in range(self.serial):
            serials += ["-serial", "null"]
        serials += ["-serial", "chardev:ev-con"]
        drive = (
            ["-drive", f"if=sd,format=raw,file={self.sd_card}"] if self.sd_card is not None else []
        )
        return qemu_base(
            self.machine,
            binary=self.binary,
            extra=[
                *(["-accel", self.accel] if self.accel else []),
                "-kernel",
                str(self.firmware),
                *drive,
                "-chardev",
                f"socket,id=ev-con,path={self.console_socket},server=on,wait=on",
                *serials,
                "-monitor",
                "none",
                "-no-reboot",
            ],
        )

    def on(self) -> None:
        check_binary(self.binary)
        self.off()
        self.console_socket.unlink(missing_ok=True)
        self.qemu = QemuProcess(self.command(), self.build / "qemu.log")
        self.boots += 1
        wait_for_path(self.console_socket, 30, "QEMU console socket", self.qemu)

    def check(self) -> None:
        if self.qemu is not None:
            self.qemu.check_alive()

    def off(self) -> None:
        if self.qemu is not None:
            self.qemu.stop()
            self.qemu = None
