"""gpio and i2c devices from their validated options: simulated or real peripherals.

``gpio:lines=led+button[,ctl=SOCK]``: a simulated bank with those line names, driven from
outside through the control socket ``ctl``. ``gpio:lines=led@0+button@1,chip=/dev/gpiochip0``
(or ``chip=LABEL``): the real chip's lines at those offsets, under those names (the
service VM's gpio-sim chip); a line without ``@OFFSET`` is found on the chip by its name.
Only the listed lines reach the guest.

``i2c:devices=eeprom@0x50+regmap@0x48[,allow=0x50][,eeprom_file=F]``: simulated devices;
``allow`` defaults to their addresses. ``i2c:bus=/dev/i2c-1,allow=0x50+0x48``: a real adapter
(the service VM's i2c-stub); ``allow`` is required there.
"""

from __future__ import annotations

import re
from typing import Any

from edgevirt.backend.devices.base import VirtioDevice
from edgevirt.errors import ConfigError

LINE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,31}$")


def parse_lines(text: str, where: str) -> list[tuple[str, int | None]]:
    """``led@0+button`` → ``[("led", 0), ("button", None)]`` (names unique, ASCII)."""
    out: list[tuple[str, int | None]] = []
    for item in text.split("+"):
        name, at, offset = item.partition("@")
        if not LINE_NAME.match(name):
            raise ConfigError(f"{where}: line name {name!r}: expected 1-31 of A-Z a-z 0-9 _ . -")
        if name in (n for n, _ in out):
            raise ConfigError(f"{where}: line name {name!r} given twice")
        off: int | None = None
        if at:
            try:
                off = int(offset, 0)
            except ValueError:
                raise ConfigError(f"{where}: line {item!r}: offset {offset!r} is not a number") \
                    from None  # fmt: skip
            if not 0 <= off < 65536:
                raise ConfigError(f"{where}: line {item!r}: offset outside 0..65535")
        out.append((name, off))
    return out


def make_peripheral(kind: str, opts: dict[str, Any], where: str) -> VirtioDevice:
    if kind == "gpio":
        from edgevirt.backend.devices.gpio import GpioDevice

        lines = parse_lines(opts["lines"], f"{where}: lines")
        if "chip" in opts:
            if "ctl" in opts:
                raise ConfigError(f"{where}: ctl= drives a simulated bank; a real chip "
                                  "(chip=) is driven by whatever is wired to it")  # fmt: skip
            from edgevirt.backend.devices.gpiocdev import CdevBank

            return GpioDevice(CdevBank(opts["chip"], lines))
        if any(off is not None for _, off in lines):
            raise ConfigError(f"{where}: lines: @OFFSET needs chip= (a simulated bank numbers "
                              "its lines itself)")  # fmt: skip
        from edgevirt.backend.devices.gpiosim import SimBank

        return GpioDevice(SimBank([n for n, _ in lines], opts.get("ctl")))
    from edgevirt.backend.devices.i2c import I2cDevice, parse_addresses

    allow = parse_addresses(opts["allow"], f"{where}: allow") if "allow" in opts else None
    if "bus" in opts:
        if "devices" in opts or "eeprom_file" in opts:
            raise ConfigError(f"{where}: devices=/eeprom_file= simulate a bus; bus= is a real "
                              "adapter, give one or the other")  # fmt: skip
        if allow is None:
            raise ConfigError(f"{where}: a real adapter (bus=) needs allow=ADDR[+ADDR…]: the "
                              "addresses this front-end may reach")  # fmt: skip
        from edgevirt.backend.devices.i2cdev import LinuxBus

        return I2cDevice(LinuxBus(opts["bus"]), allow)
    if "devices" not in opts:
        raise ConfigError(f"{where}: i2c needs devices=KIND@ADDR[+…] (simulated: eeprom, "
                          "regmap) or bus=/dev/i2c-N with allow=")  # fmt: skip
    from edgevirt.backend.devices.i2csim import SimBus

    bus = SimBus.parse(opts["devices"], f"{where}: devices", opts.get("eeprom_file"))
    return I2cDevice(bus, allow if allow is not None else sorted(bus.devices))
