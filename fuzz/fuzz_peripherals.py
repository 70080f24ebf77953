"""atheris target: the gpio and i2c devices (simulated bank and bus) under a hostile driver.

Like ``fuzz_devices.py``: the input's tail is guest memory, its head the chains (segments
anywhere, any direction), which queue each goes to, and what the outside world does to
the GPIO lines in between (edges while the driver's eventq pairs wait or not). Through
:class:`~edgevirt.backend.devices.fakehost.FakeHost`, the devices may raise only
BackendError, and every completion must be a held chain, once, on its own queue, within
its device-writable length; an I2C group left open is dropped when its queue stops.

    .venv/bin/python fuzz/fuzz_peripherals.py -runs=100000 -max_len=4096 -len_control=0
"""

from __future__ import annotations

import logging
import sys

import atheris

with atheris.instrument_imports():
    import devharness

    from edgevirt.backend.devices.base import Chain, VirtioDevice
    from edgevirt.backend.devices.gpio import GpioDevice
    from edgevirt.backend.devices.gpiosim import SimBank
    from edgevirt.backend.devices.i2c import I2cDevice
    from edgevirt.backend.devices.i2csim import SimBus
    from edgevirt.errors import BackendError


def _size(fdp: atheris.FuzzedDataProvider) -> int:
    # Small buffers mostly: the real requests are 8 + 2 (gpio), 8 + n + 1 (i2c).
    return fdp.ConsumeIntInRange(0, 12) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 9000)


def chain_from(fdp: atheris.FuzzedDataProvider, head: int) -> Chain:
    return devharness.chain_from(fdp, head, 512, _size)


def TestOneInput(data: bytes) -> None:
    kind, fdp, host = devharness.start(data, 2)
    bank = None
    dev: VirtioDevice
    if kind == 0:
        bank = SimBank(["a", "b", "c"])
        dev = GpioDevice(bank)
    else:
        dev = I2cDevice(SimBus.parse("eeprom@0x50+regmap@0x48", "fuzz"), [0x50, 0x51])
    dev.attach(host)
    dev.acked_features = fdp.ConsumeIntInRange(0, 1) & dev.features
    try:
        for round_ in range(2):
            for head in range(fdp.ConsumeIntInRange(1, 16)):
                queue = fdp.ConsumeIntInRange(0, dev.num_queues - 1)
                try:
                    host.offer(dev, queue, chain_from(fdp, head + 100 * round_))
                except BackendError:
                    host.stop(dev, queue)  # the transport breaks that queue
                if bank is not None and fdp.ConsumeBool():  # the outside moves a line
                    line = fdp.ConsumeIntInRange(0, 2)
                    if bank.direction[line] != 1:  # not an output the guest drives
                        bank.drive(line, fdp.ConsumeIntInRange(0, 1))
            if round_ == 0:
                dev.reset()
                for q in range(dev.num_queues):
                    host.stop(dev, q)
        for q in range(dev.num_queues):
            host.stop(dev, q)
        if isinstance(dev, I2cDevice):
            assert dev.group == [], "an open I2C group survived its queue's stop"
        if isinstance(dev, GpioDevice):
            assert all(ln.event is None for ln in dev.lines), "a GPIO pair survived the stop"
    finally:
        dev.close()


def main() -> None:
    logging.disable(logging.CRITICAL)  # bad-request warnings are expected here
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
