"""A real I2C adapter through Linux's I2C character device (``/dev/i2c-N``, i2c-dev).

An adapter that speaks plain I2C (``I2C_FUNC_I2C``) gets each virtio-i2c group as one
``I2C_RDWR`` ioctl (one transaction, repeated starts). An SMBus-only adapter, such as
i2c-stub (what the service VM lends in the tests) or many PMIC/SoC SMBus controllers, gets
the group translated into the one SMBus command it stands for, the way the kernel's own
SMBus emulation builds groups in the other direction:

=====================================  ========================================
group (w = write, r = read, n bytes)   SMBus command
=====================================  ========================================
w0 / r0                                quick write / quick read
w1 [c]                                 send byte c
r1                                     receive byte
w2 [c, v]                              write byte data
w3 [c, lo, hi]                         write word data
w(2+n) [c, d…], n ≤ 32                 write I2C block data
w1 [c], r1 / r2 / r(n ≤ 32)            read byte / word / I2C block data
=====================================  ========================================

Anything else fails that group with an error status (and a log line): the adapter cannot
express it. The slave address is set with ``I2C_SLAVE``, not ``I2C_SLAVE_FORCE``: an
address a kernel driver in the service VM has claimed stays its own (EBUSY → error status).
The ioctls block the event loop for the length of one transaction (microseconds on
i2c-stub, about 0.1 ms per byte at 100 kHz on a real bus).
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
from pathlib import Path

from edgevirt.backend.devices.i2c import I2cError, Msg
from edgevirt.errors import ConfigError

log = logging.getLogger(__name__)

I2C_SLAVE, I2C_FUNCS, I2C_RDWR, I2C_SMBUS = 0x0703, 0x0705, 0x0707, 0x0720
I2C_M_RD = 0x0001
FUNC_I2C = 0x00000001
SMBUS_READ, SMBUS_WRITE = 1, 0
QUICK, BYTE, BYTE_DATA, WORD_DATA, I2C_BLOCK_DATA = 0, 1, 2, 3, 8
SIZE_NAMES = {QUICK: "quick", BYTE: "byte", BYTE_DATA: "byte data", WORD_DATA: "word data",
              I2C_BLOCK_DATA: "i2c block data"}  # fmt: skip
BLOCK_MAX = 32


class _I2cMsg(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint16), ("flags", ctypes.c_uint16),
                ("len", ctypes.c_uint16), ("buf", ctypes.c_void_p)]  # fmt: skip


class _RdwrData(ctypes.Structure):
    _fields_ = [("msgs", ctypes.c_void_p), ("nmsgs", ctypes.c_uint32)]


class _SmbusData(ctypes.Structure):
    _fields_ = [("read_write", ctypes.c_uint8), ("command", ctypes.c_uint8),
                ("size", ctypes.c_uint32), ("data", ctypes.c_void_p)]  # fmt: skip


def smbus_plan(msgs: list[Msg]) -> tuple[int, int, int, bytes, int]:
    """The SMBus command a group stands for: (read_write, command, size, data to write as
    ``union i2c_smbus_data``, bytes to read back). Raises :class:`I2cError` otherwise."""
    if len({m.addr for m in msgs}) != 1:
        raise I2cError(0, "an SMBus command addresses one device")
    kinds = [("r" if m.read else "w", m.length) for m in msgs]
    if len(msgs) == 1:
        m = msgs[0]
        if m.length == 0:
            return (SMBUS_READ if m.read else SMBUS_WRITE), 0, QUICK, b"", 0
        if m.read and m.length == 1:
            return SMBUS_READ, 0, BYTE, b"", 1
        if not m.read:
            c, rest = m.data[0], m.data[1:]
            if not rest:
                return SMBUS_WRITE, c, BYTE, b"", 0
            if len(rest) == 1:
                return SMBUS_WRITE, c, BYTE_DATA, rest, 0
            if len(rest) == 2:
                return SMBUS_WRITE, c, WORD_DATA, rest, 0
            if len(rest) <= BLOCK_MAX:
                return SMBUS_WRITE, c, I2C_BLOCK_DATA, bytes([len(rest)]) + rest, 0
    elif len(msgs) == 2 and kinds[0] == ("w", 1) and msgs[1].read and msgs[1].length:
        c, n = msgs[0].data[0], msgs[1].length
        if n == 1:
            return SMBUS_READ, c, BYTE_DATA, b"", 1
        if n == 2:
            return SMBUS_READ, c, WORD_DATA, b"", 2
        if n <= BLOCK_MAX:
            return SMBUS_READ, c, I2C_BLOCK_DATA, bytes([n]), n
    shape = " + ".join(f"{k}{n}" for k, n in kinds)
    raise I2cError(0, f"group {shape} has no SMBus equivalent on this SMBus-only adapter")


def find_adapter(name: str, sysfs: Path = Path("/sys/class/i2c-dev")) -> str:
    """``/dev/i2c-N`` as given, ``i2c-N``, or the adapter whose name is ``name``
    (``SMBus stub driver`` is i2c-stub)."""
    if name.startswith("/"):
        return name
    if (sysfs / name).is_dir():
        return f"/dev/{name}"
    seen = []
    for d in sorted(sysfs.glob("i2c-*")):
        try:
            adapter = (d / "name").read_text().strip()
        except OSError:
            continue
        seen.append(f"{d.name} ({adapter})")
        if adapter == name:
            return f"/dev/{d.name}"
    raise ConfigError(f"i2c: bus={name}: no adapter of that name; present: "
                      f"{', '.join(seen) or 'none'}")  # fmt: skip


class LinuxBus:
    def __init__(self, name: str) -> None:
        self.path = path = find_adapter(name)
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(f"i2c: bus={path}: {e.strerror} (an i2c-dev node, /dev/i2c-N)") \
                from e  # fmt: skip
        try:
            buf = bytearray(8)
            fcntl.ioctl(self.fd, I2C_FUNCS, buf)
        except OSError as e:
            os.close(self.fd)
            raise ConfigError(f"i2c: bus={path}: not an I2C adapter ({e.strerror})") from e
        self.funcs = int.from_bytes(buf, "little")
        self.plain_i2c = bool(self.funcs & FUNC_I2C)
        self.address = -1

    def _select(self, addr: int) -> None:
        if addr != self.address:
            try:
                fcntl.ioctl(self.fd, I2C_SLAVE, addr)
            except OSError as e:
                raise I2cError(0, f"{self.path}: address {addr:#04x}: {e.strerror}") from e
            self.address = addr

    def transfer(self, msgs: list[Msg]) -> None:
        if self.plain_i2c:
            self._rdwr(msgs)
        else:
            self._smbus(msgs)

    def _rdwr(self, msgs: list[Msg]) -> None:
        bufs = [ctypes.create_string_buffer(m.data if not m.read else m.length, max(1, m.length))
                for m in msgs]  # fmt: skip
        arr = (_I2cMsg * len(msgs))(*(
            _I2cMsg(m.addr, I2C_M_RD if m.read else 0, m.length, ctypes.addressof(b))
            for m, b in zip(msgs, bufs, strict=True)))  # fmt: skip
        data = _RdwrData(ctypes.addressof(arr), len(msgs))
        try:
            fcntl.ioctl(self.fd, I2C_RDWR, bytearray(bytes(data)))  # type: ignore[arg-type]
        except OSError as e:
            raise I2cError(0, f"{self.path}: I2C_RDWR: {e.strerror}") from e
        for m, b in zip(msgs, bufs, strict=True):
            if m.read:
                m.data = b.raw[: m.length]

    def _smbus(self, msgs: list[Msg]) -> None:
        rw, command, size, wdata, rlen = smbus_plan(msgs)
        self._select(msgs[0].addr)
        union = ctypes.create_string_buffer(wdata, 34)
        arg = _SmbusData(rw, command, size, ctypes.addressof(union))
        try:
            fcntl.ioctl(self.fd, I2C_SMBUS, bytearray(bytes(arg)))  # type: ignore[arg-type]
        except OSError as e:
            raise I2cError(0, f"{self.path}: SMBus {SIZE_NAMES[size]} "
                           f"{'read' if rw else 'write'} at {msgs[0].addr:#04x}: "
                           f"{e.strerror}") from e  # fmt: skip
        if rlen:
            raw = union.raw
            msgs[-1].data = raw[1 : 1 + rlen] if size == I2C_BLOCK_DATA else raw[:rlen]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def describe(self) -> str:
        return f"{self.path} ({'i2c' if self.plain_i2c else 'smbus'})"
