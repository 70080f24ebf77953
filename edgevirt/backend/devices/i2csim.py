"""Simulated I2C devices on a simulated bus, for virtio-i2c on a host without an adapter.

``eeprom``: an AT24C02-like 256-byte EEPROM. A write's first byte sets the word address
(the address pointer), the following bytes are a *page write*: 8-byte pages, the low three
address bits wrap inside the page (a ninth byte overwrites the first, as on the part). A
read returns bytes from the pointer on, wrapping at the end of the array (sequential read);
a write of just the word address followed by a read is the "random read". The pointer
survives between transactions ("current address read"). Contents start as 0xff (erased)
unless ``file`` names an image, which is then kept up to date.

``regmap``: a register-map device (a sensor-like part): 256 8-bit registers behind an 8-bit
register pointer with auto-increment; register 0x0f (``WHO_AM_I``) reads 0xa5 and ignores
writes, everything else is read/write.

Addresses nobody answers NACK (the transfer fails at that message).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from edgevirt.backend.devices.i2c import I2cError, Msg
from edgevirt.errors import ConfigError

EEPROM_SIZE = 256
EEPROM_PAGE = 8
WHO_AM_I, WHO_AM_I_VALUE = 0x0F, 0xA5


class SimDevice:
    kind = "device"

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def read(self, n: int) -> bytes:
        raise NotImplementedError


class Eeprom(SimDevice):
    kind = "eeprom"

    def __init__(self, file: str | os.PathLike[str] | None = None) -> None:
        self.file = Path(file) if file is not None else None
        self.mem = bytearray(b"\xff" * EEPROM_SIZE)
        if self.file is not None and self.file.exists():
            data = self.file.read_bytes()
            if len(data) != EEPROM_SIZE:
                raise ConfigError(f"i2c eeprom file {self.file}: {len(data)} bytes, expected "
                                  f"{EEPROM_SIZE}")  # fmt: skip
            self.mem[:] = data
        self.pointer = 0

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.pointer = data[0]
        page = self.pointer & ~(EEPROM_PAGE - 1)
        for b in data[1:]:
            self.mem[self.pointer] = b
            self.pointer = page | (self.pointer + 1) & (EEPROM_PAGE - 1)
        if len(data) > 1 and self.file is not None:
            tmp = self.file.with_suffix(".tmp")
            tmp.write_bytes(self.mem)
            tmp.replace(self.file)

    def read(self, n: int) -> bytes:
        out = bytearray()
        for _ in range(n):
            out.append(self.mem[self.pointer])
            self.pointer = (self.pointer + 1) % EEPROM_SIZE
        return bytes(out)


class RegMap(SimDevice):
    kind = "regmap"

    def __init__(self) -> None:
        self.regs = bytearray(256)
        self.regs[WHO_AM_I] = WHO_AM_I_VALUE
        self.pointer = 0

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.pointer = data[0]
        for b in data[1:]:
            if self.pointer != WHO_AM_I:
                self.regs[self.pointer] = b
            self.pointer = (self.pointer + 1) & 0xFF

    def read(self, n: int) -> bytes:
        out = bytearray()
        for _ in range(n):
            out.append(self.regs[self.pointer])
            self.pointer = (self.pointer + 1) & 0xFF
        return bytes(out)


KINDS = {"eeprom": Eeprom, "regmap": RegMap}


class SimBus:
    def __init__(self, devices: dict[int, SimDevice]) -> None:
        self.devices = devices

    @classmethod
    def parse(cls, text: str | Sequence[str], where: str,
              eeprom_file: str | None = None) -> SimBus:  # fmt: skip
        """``eeprom@0x50+regmap@0x48`` (or a list of such items) → a bus."""
        items = text.split("+") if isinstance(text, str) else list(text)
        devices: dict[int, SimDevice] = {}
        for item in items:
            kind, at, addr = item.partition("@")
            if kind not in KINDS or not at:
                raise ConfigError(f"{where}: device {item!r}: expected KIND@ADDRESS with KIND "
                                  f"one of {', '.join(KINDS)}")  # fmt: skip
            try:
                a = int(addr, 0)
            except ValueError:
                raise ConfigError(f"{where}: device {item!r}: {addr!r} is not a number") from None
            if not 0x03 <= a <= 0x77:
                raise ConfigError(f"{where}: device {item!r}: address outside 0x03..0x77")
            if a in devices:
                raise ConfigError(f"{where}: two devices at {a:#04x}")
            if kind == "eeprom":
                devices[a] = Eeprom(eeprom_file)
                eeprom_file = None  # the image belongs to the first EEPROM only
            else:
                devices[a] = RegMap()
        if not devices:
            raise ConfigError(f"{where}: expected at least one simulated device")
        return cls(devices)

    def transfer(self, msgs: list[Msg]) -> None:
        for i, m in enumerate(msgs):
            dev = self.devices.get(m.addr)
            if dev is None:
                raise I2cError(i, f"no device answers at {m.addr:#04x} (NACK)")
            if m.read:
                m.data = dev.read(m.length)
            else:
                dev.write(m.data)

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return "simulated " + " ".join(
            f"{d.kind}@{a:#04x}" for a, d in sorted(self.devices.items())
        )
