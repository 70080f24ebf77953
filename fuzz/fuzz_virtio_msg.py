"""atheris target: virtio-msg messages from a hostile driver, through the one choke point
(protocol.decode) and then the whole device side (MsgBus: dispatch, devices, rings in a
small carve-out), the way the to-device ring delivers them: one slot per 264 input bytes.

Only VirtioMsgError may come out of decode; a decoded message re-encodes to the same bytes
(type bits 2..7 aside, which receivers ignore); the bus never raises, and everything it
sends back decodes cleanly.

    PYTHONPATH=. .venv/bin/python fuzz/fuzz_virtio_msg.py fuzz/corpus/virtio_msg -max_len=2112
"""

import logging
import sys

import atheris

with atheris.instrument_imports():
    from edgevirt.backend.devices import RngDevice
    from edgevirt.backend.loop import Loop
    from edgevirt.backend.memory import GuestMemory, anonymous
    from edgevirt.backend.transport.virtio_msg import protocol as p
    from edgevirt.backend.transport.virtio_msg.bus import MsgBus
    from edgevirt.backend.transport.virtio_msg.channel import SLOT_SIZE

BASE = 0x5C00_0000
_loop = Loop()
_mem = GuestMemory()
_mem.add(anonymous(BASE, 64 << 10))
_bus = MsgBus([RngDevice(), RngDevice()], _mem, _loop)  # no socket: no doorbells, no files


def TestOneInput(data: bytes) -> None:
    for off in range(0, min(len(data), 8 * SLOT_SIZE), SLOT_SIZE):
        raw = data[off : off + SLOT_SIZE]
        try:
            msg = p.decode(raw)
        except p.VirtioMsgError:
            msg = None
        if msg is not None:
            size = int.from_bytes(raw[6:8], "little")
            again = p.encode(msg)
            assert again[1:] == raw[1:size] and again[0] == raw[0] & 3, (raw, again)
        if len(raw) >= 8 and _bus.msgmem.to_device.put(raw.ljust(8, b"\0")) is None:
            break
    _bus.poll()
    while (out := _bus.msgmem.to_driver.get()) is not None:
        p.decode(out)  # our own messages are always well formed
    assert _bus.msgmem.to_device.broken is None and _bus.msgmem.to_driver.broken is None


def main() -> None:
    logging.disable(logging.CRITICAL)  # discarded-message log lines are expected here
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
