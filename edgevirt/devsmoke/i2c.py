"""virtio-i2c with an allow-list: three devices on the bus, two lent to the guest.

Host back-end: it simulates an AT24C02-like EEPROM at 0x50 (its image a file of this run),
a register-map device at 0x48 and a second EEPROM at 0x51. Back-end in the service VM: the
bus is the service VM's real I2C stack, an i2c-stub adapter answering at the same three
addresses (256-byte register maps), reached through its ``/dev/i2c-N``. Either way the
guest was given 0x48 and 0x50 only: its ``i2cdetect`` must list exactly those;
``i2cset``/``i2cget`` write and read 0x50 and the byte is there on the back-end's side
afterwards (the image file, or ``i2cget`` in the service VM); 0x51 fails with an I/O error.
"""

from __future__ import annotations

import re
from pathlib import Path

from edgevirt.console.expect import Console
from edgevirt.devsmoke import DeviceSmoke
from edgevirt.errors import DeployError
from edgevirt.smoke import Check

ALLOWED = (0x48, 0x50)
HIDDEN = 0x51
EEPROM_OFFSET, EEPROM_VALUE = 0x10, 0xAB
#: i2c-stub's adapter name (edgevirt.servicevm.peripherals.I2C_STUB_NAME).
STUB_NAME = "SMBus stub driver"


def detected(table: str) -> list[int]:
    """Addresses ``i2cdetect`` shows as present: rows ``50: 50 -- -- …``."""
    found = []
    for m in re.finditer(r"^([0-7])0:((?: ..| {2}){1,16})", table, re.M):
        for col, cell in enumerate(re.findall(r" (..)", m.group(2))):
            if re.fullmatch(r"[0-9a-f]{2}|UU", cell):
                found.append(int(m.group(1), 16) * 16 + col)
    return found


class I2cSmoke(DeviceSmoke):
    type = "i2c"
    qemu_kind = "vhost-user-i2c-device"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.image = self.dir / "eeprom.bin"
        #: i2c-stub's bus number in the service VM.
        self.stub_bus = ""

    def backend_arg(self) -> str:
        allow = "+".join(f"{a:#x}" for a in ALLOWED)
        return (f"i2c:devices=eeprom@0x50+regmap@0x48+eeprom@{HIDDEN:#x},allow={allow},"
                f"eeprom_file={self.image}")  # fmt: skip

    def service_arg(self) -> str:
        return f"i2c:bus={STUB_NAME},allow={'+'.join(f'{a:#x}' for a in ALLOWED)}"

    def service_peripherals(self) -> dict:
        return {"i2c_stub": {"addresses": sorted({*ALLOWED, HIDDEN})}}

    def service_ready(self) -> None:
        assert self.service is not None
        r = self.service.run("for a in /sys/class/i2c-dev/*; do echo $(basename $a) "
                             "$(cat $a/name); done", 20)  # fmt: skip
        buses = [ln.split()[0] for ln in r.output.splitlines() if STUB_NAME in ln]
        if len(buses) != 1:
            raise DeployError(f"service VM: no i2c-stub adapter: {r.output[-200:]}")
        self.stub_bus = buses[0].removeprefix("i2c-")

    def before_backend(self) -> None:
        self.image.unlink(missing_ok=True)

    def backend_byte(self, offset: int) -> int | None:
        """The EEPROM's byte at ``offset`` as the back-end's side sees it."""
        if self.service is not None:
            r = self.service.run(f"i2cget -y {self.stub_bus} 0x50 {offset:#x}", 20)
            word = r.output.split()[-1] if r.output.split() else ""
            return int(word, 16) if r.status == 0 and word.startswith("0x") else None
        data = self.image.read_bytes() if self.image.is_file() else b""
        return data[offset] if len(data) > offset else None

    def run(self, console: Console, prefix: str = "") -> list[Check]:
        r = console.run("ls /sys/bus/i2c/devices/", 10)
        buses = re.findall(r"i2c-(\d+)", r.output)
        if len(buses) != 1:
            return [Check(f"{prefix}i2c allow-list", False, f"i2c buses: {r.output.strip()}")]
        bus = buses[0]
        r = console.run(f"i2cdetect -y {bus}", 30)
        found = detected(r.output) if r.status == 0 else []
        ok = found == list(ALLOWED)
        listed = " ".join(f"{a:#x}" for a in found) or "none"
        checks = [Check(f"{prefix}i2c allow-list", ok,
                        f"i2cdetect on i2c-{bus} lists exactly {listed}" if ok
                        else f"i2cdetect lists {listed}, expected exactly "
                        + " ".join(f"{a:#x}" for a in ALLOWED))]  # fmt: skip
        r = console.run(f"i2cset -y {bus} 0x50 {EEPROM_OFFSET:#x} {EEPROM_VALUE:#x} && "
                        f"i2cget -y {bus} 0x50 {EEPROM_OFFSET:#x}", 20)  # fmt: skip
        guest_ok = r.status == 0 and r.output.split()[-1:] == [f"{EEPROM_VALUE:#x}"]
        host = self.backend_byte(EEPROM_OFFSET)
        side = f"i2c-stub ({self.stub_bus}) in the service VM" if self.service \
            else "back-end image"  # fmt: skip
        ok = guest_ok and host == EEPROM_VALUE
        checks.append(
            Check(
                f"{prefix}i2c EEPROM write/read",
                ok,
                f"guest wrote and read {EEPROM_VALUE:#x} at 0x50/{EEPROM_OFFSET:#x}, "
                f"{side} holds {host if host is None else hex(host)}",
            )
        )
        r = console.run(f"i2cget -y {bus} {HIDDEN:#x} 0x00", 20)
        ok = r.status != 0 and "Input/output error" in r.output
        checks.append(
            Check(
                f"{prefix}i2c address not allowed",
                ok,
                f"{HIDDEN:#x} (on the bus, not lent) fails with an I/O error"
                if ok
                else f"status {r.status}: {r.output.strip()[-120:]}",
            )
        )
        return checks
