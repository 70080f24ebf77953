"""A real GPIO bank: lines of a Linux gpiochip through the GPIO character device, v2 uAPI.

The service VM's back-end lends lines of one of its chips (a gpio-sim chip in the tests,
a SoC bank on a board). Each guest line maps to one chip offset; nothing else on the chip
is reachable. A line is *requested* from the kernel only while the guest uses it: as an
input with both edges detected (``GPIO_V2_LINE_FLAG_EDGE_RISING | _FALLING``; the edge
events, read from the request's fd on the back-end's event loop, become the device's
interrupts), or as an output with the guest's value. Direction NONE releases it, so other
users in the service VM may take it again; a line another consumer holds gives the guest an
error status (EBUSY) instead.

ioctl layouts are those of ``include/uapi/linux/gpio.h`` (identical on arm64 and x86_64).
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import struct
from collections.abc import Callable, Sequence

from edgevirt.backend.devices.base import DeviceHost
from edgevirt.backend.devices.gpio import DIR_NONE, DIR_OUT, GpioError
from edgevirt.errors import ConfigError

log = logging.getLogger(__name__)


def _iowr(nr: int, size: int, read_only: bool = False) -> int:
    return (2 if read_only else 3) << 30 | size << 16 | 0xB4 << 8 | nr


CHIPINFO = struct.Struct("<32s32sI")
LINEINFO = struct.Struct("<32s32sIIQ160s16s")
LINE_REQUEST_SIZE = 592
LINE_VALUES = struct.Struct("<QQ")
LINE_EVENT = struct.Struct("<QIIII24s")
GPIO_GET_CHIPINFO_IOCTL = _iowr(0x01, CHIPINFO.size, read_only=True)
GPIO_V2_GET_LINEINFO_IOCTL = _iowr(0x05, LINEINFO.size)
GPIO_V2_GET_LINE_IOCTL = _iowr(0x07, LINE_REQUEST_SIZE)
GPIO_V2_LINE_GET_VALUES_IOCTL = _iowr(0x0E, LINE_VALUES.size)
GPIO_V2_LINE_SET_VALUES_IOCTL = _iowr(0x0F, LINE_VALUES.size)
FLAG_INPUT, FLAG_OUTPUT, FLAG_EDGE_RISING, FLAG_EDGE_FALLING = 1 << 2, 1 << 3, 1 << 4, 1 << 5
ATTR_ID_OUTPUT_VALUES = 2
EVENT_RISING_EDGE = 1
CONSUMER = b"edgevirt-gpio"


def line_request(offset: int, flags: int, value: int | None = None) -> bytearray:
    """``struct gpio_v2_line_request`` for one line (with its output value if given)."""
    req = bytearray(LINE_REQUEST_SIZE)
    struct.pack_into("<I", req, 0, offset)  # offsets[0]
    req[256 : 256 + len(CONSUMER)] = CONSUMER
    cfg = 288  # struct gpio_v2_line_config: flags, num_attrs, padding[5], attrs[10]
    struct.pack_into("<QI", req, cfg, flags, 1 if value is not None else 0)
    if value is not None:  # attrs[0]: {id, padding, values}, mask
        struct.pack_into("<IIQQ", req, cfg + 32, ATTR_ID_OUTPUT_VALUES, 0, value & 1, 1)
    struct.pack_into("<II", req, 560, 1, 0)  # num_lines, event_buffer_size (default)
    return req


def request_fd(req: bytearray) -> int:
    return int(struct.unpack_from("<i", req, 588)[0])


def find_chip(chip: str) -> str:
    """``/dev/gpiochipN`` as given, or the chip whose label (or name) is ``chip``."""
    if chip.startswith("/"):
        return chip
    for path in sorted(glob.glob("/dev/gpiochip*")):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            buf = bytearray(CHIPINFO.size)
            fcntl.ioctl(fd, GPIO_GET_CHIPINFO_IOCTL, buf)
        except OSError:
            continue
        finally:
            os.close(fd)
        name, label, _ = CHIPINFO.unpack(buf)
        if chip in (_cstr(name), _cstr(label)):
            return path
    raise ConfigError(f"gpio: chip={chip}: no /dev/gpiochip* with that label or name")


def _cstr(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("ascii", "replace")


class CdevBank:
    def __init__(self, chip: str, lines: Sequence[tuple[str, int | None]]) -> None:
        self.path = find_chip(chip)
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(f"gpio: chip={self.path}: {e.strerror}") from e
        try:
            buf = bytearray(CHIPINFO.size)
            fcntl.ioctl(self.fd, GPIO_GET_CHIPINFO_IOCTL, buf)
            _, label, nlines = CHIPINFO.unpack(buf)
            self.label = _cstr(label)
            chip_names = [self._line_name(i) for i in range(nlines)]
        except OSError as e:
            os.close(self.fd)
            raise ConfigError(f"gpio: chip={self.path}: not a gpiochip ({e.strerror})") from e
        self._names = [n for n, _ in lines]
        self.offsets: list[int] = []
        for name, off in lines:
            if off is None:
                if name not in chip_names:
                    os.close(self.fd)
                    raise ConfigError(f"gpio: line {name!r}: {self.path} ({self.label}) has no "
                                      "line of that name; give NAME@OFFSET")  # fmt: skip
                off = chip_names.index(name)
            if off >= nlines:
                os.close(self.fd)
                raise ConfigError(f"gpio: line {name}@{off}: {self.path} ({self.label}) has "
                                  f"{nlines} lines")  # fmt: skip
            self.offsets.append(off)
        self.requests: dict[int, tuple[int, int]] = {}  # line -> (fd, direction)
        self.host: DeviceHost | None = None
        self.changed: Callable[[int, int, int], None] | None = None

    @property
    def names(self) -> Sequence[str]:
        return self._names

    def _line_name(self, offset: int) -> str:
        buf = bytearray(LINEINFO.size)
        struct.pack_into("<I", buf, 64, offset)
        fcntl.ioctl(self.fd, GPIO_V2_GET_LINEINFO_IOCTL, buf)
        return _cstr(LINEINFO.unpack(buf)[0])

    def attach(self, host: DeviceHost, changed: Callable[[int, int, int], None]) -> None:
        self.host, self.changed = host, changed

    def _request(self, line: int, flags: int, value: int | None = None) -> int:
        req = line_request(self.offsets[line], flags, value)
        try:
            fcntl.ioctl(self.fd, GPIO_V2_GET_LINE_IOCTL, req)
        except OSError as e:
            raise GpioError(f"{self.path} offset {self.offsets[line]}: request: "
                            f"{e.strerror}") from e  # fmt: skip
        return request_fd(req)

    def _release(self, line: int) -> None:
        held = self.requests.pop(line, None)
        if held is not None:
            if self.host is not None:
                self.host.remove_reader(held[0])
            os.close(held[0])

    def set_direction(self, line: int, direction: int, value: int) -> None:
        self._release(line)
        if direction == DIR_NONE:
            return
        if direction == DIR_OUT:
            fd = self._request(line, FLAG_OUTPUT, value)
        else:
            fd = self._request(line, FLAG_INPUT | FLAG_EDGE_RISING | FLAG_EDGE_FALLING)
            if self.host is not None:
                self.host.add_reader(fd, lambda: self._events(line, fd))
        self.requests[line] = (fd, direction)

    def set_value(self, line: int, value: int) -> None:
        held = self.requests.get(line)
        if held is None or held[1] != DIR_OUT:
            raise GpioError("not an output")
        try:
            fcntl.ioctl(held[0], GPIO_V2_LINE_SET_VALUES_IOCTL,
                        bytearray(LINE_VALUES.pack(value & 1, 1)))  # fmt: skip
        except OSError as e:
            raise GpioError(f"set value: {e.strerror}") from e

    def get_value(self, line: int) -> int:
        held = self.requests.get(line)
        fd = held[0] if held is not None else self._request(line, 0)  # 0: direction as is
        try:
            buf = bytearray(LINE_VALUES.pack(0, 1))
            fcntl.ioctl(fd, GPIO_V2_LINE_GET_VALUES_IOCTL, buf)
            return int(LINE_VALUES.unpack(buf)[0] & 1)
        except OSError as e:
            raise GpioError(f"get value: {e.strerror}") from e
        finally:
            if held is None:
                os.close(fd)

    def _events(self, line: int, fd: int) -> None:
        try:
            data = os.read(fd, LINE_EVENT.size * 16)
        except BlockingIOError:
            return
        except OSError as e:
            log.warning("gpio: %s offset %d: events: %s", self.path, self.offsets[line], e)
            self._release(line)
            return
        for pos in range(0, len(data) - LINE_EVENT.size + 1, LINE_EVENT.size):
            # timestamp_ns: the kernel's CLOCK_MONOTONIC at the edge (the v2 default clock)
            ts, ident, *_ = LINE_EVENT.unpack_from(data, pos)
            if self.changed is not None:
                self.changed(line, 1 if ident == EVENT_RISING_EDGE else 0, ts)

    def close(self) -> None:
        for line in list(self.requests):
            self._release(line)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def describe(self) -> str:
        offsets = ",".join(str(o) for o in self.offsets)
        return f"{self.path} ({self.label}) offsets {offsets}, {len(self.requests)} requested"
