"""atheris target: virtio-msg messages from a hostile driver, through the one choke point
(protocol.decode) and then the whole device side (MsgBus: dispatch, devices, rings in a
small carve-out), the way the to-device ring delivers them: one slot per 264 input bytes.

Only VirtioMsgError may come out of decode; a decoded message re-encodes to the same bytes
(type bits 2..7 aside, which receivers ignore); the bus never raises, and everything it
sends back decodes cleanly.

Random bytes rarely make a valid message, so start from the seed corpus (``--make-corpus``:
a driver's whole bring-up of a device with a virtqueue in the carve-out, every request
type, bus messages, an EVENT_AVAIL), which takes the mutations deep into the devices:

    PYTHONPATH=. .venv/bin/python fuzz/fuzz_virtio_msg.py --make-corpus fuzz/corpus/virtio_msg
    PYTHONPATH=. .venv/bin/python fuzz/fuzz_virtio_msg.py fuzz/corpus/virtio_msg -max_len=2112
"""

import logging
import sys
from pathlib import Path

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


def seeds() -> dict[str, bytes]:
    """Valid inputs, one message per 264-byte slot: what a correct driver sends."""
    M = p.MsgId

    def req(msg_id: p.MsgId, dev: int = 0, data: bytes = b"", **f: int) -> bytes:
        return p.encode(p.request(msg_id, dev, 1, data, **f)).ljust(SLOT_SIZE, b"\0")

    def bus(msg_id: p.BusMsgId, **f: int) -> bytes:
        return p.encode(p.Message(int(msg_id), 0, 1, False, True, f)).ljust(SLOT_SIZE, b"\0")

    version_1 = p.features_to_words(1 << 32, 0, 2)
    queue = {"index": 0, "reserved0": 0, "size": 8, "reserved1": 0}
    ring = {"desc": BASE, "driver": BASE + 0x80, "device": BASE + 0x100}
    bring_up = [
        req(M.SET_DEVICE_STATUS, status=0),
        req(M.SET_DEVICE_STATUS, status=p.STATUS_ACKNOWLEDGE | p.STATUS_DRIVER),
        req(M.GET_DEVICE_FEATURES, index=0, num_blocks=2),
        req(M.SET_DRIVER_FEATURES, 0, version_1, index=0, num_blocks=2),
        req(M.SET_DEVICE_STATUS, status=11),
        req(M.SET_VQUEUE, **queue, **ring),
        req(M.SET_DEVICE_STATUS, status=15),
        p.encode(p.event(M.EVENT_AVAIL, 0, index=0, next=0)).ljust(SLOT_SIZE, b"\0"),
    ]
    queries = [
        req(M.GET_DEVICE_INFO, 1),
        req(M.GET_CONFIG, 1, offset=0, size=8),
        req(M.SET_CONFIG, 1, b"\0" * 4, generation=0, offset=0, size=4),
        req(M.GET_DEVICE_STATUS, 1),
        req(M.GET_VQUEUE, 1, index=0),
        req(M.RESET_VQUEUE, 1, index=0),
        req(M.GET_SHM, 1, index=0),
        bus(p.BusMsgId.PING, data=0x1234),
    ]
    return {
        "bring-up": b"".join(bring_up),
        "queries": b"".join(queries),
        "devices": bus(p.BusMsgId.GET_DEVICES, offset=0, count=8),
    }


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
    _bus.rung()  # one EVENT_AVAIL takes the doorbell's short path, the rest poll()
    while (out := _bus.msgmem.to_driver.get()) is not None:
        p.decode(out)  # our own messages are always well formed
    assert _bus.msgmem.to_device.broken is None and _bus.msgmem.to_driver.broken is None


def main() -> None:
    if sys.argv[1:2] == ["--make-corpus"]:
        out = Path(sys.argv[2])
        out.mkdir(parents=True, exist_ok=True)
        for name, data in seeds().items():
            (out / f"seed-{name}").write_bytes(data)
        return
    logging.disable(logging.CRITICAL)  # discarded-message log lines are expected here
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
