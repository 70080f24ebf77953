"""atheris target: net, vsock and console devices fed fuzzer-written chains and guest memory.

Every input is a hostile driver: its bytes become guest memory, chains (segments anywhere,
inside or outside the carve-out, any direction), packet headers and what the host side
sends. Through :class:`~edgevirt.backend.devices.fakehost.FakeHost` (the transport's side of
the device interface), the devices may raise only BackendError (the transport would break
that queue), and every completion must be a chain the device was given and holds, on its
own queue, completed once, with a used length within its device-writable buffers.

    .venv/bin/python fuzz/fuzz_devices.py -runs=100000 -max_len=4096   # see fuzz/README.md
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    import devharness

    from edgevirt.backend.devices.base import Chain, VirtioDevice
    from edgevirt.backend.devices.console import ConsoleDevice
    from edgevirt.backend.devices.fakehost import FakeHost
    from edgevirt.backend.devices.net import NetDevice
    from edgevirt.backend.devices.tap import DatagramLink
    from edgevirt.backend.devices.vsock import VsockDevice
    from edgevirt.errors import BackendError


def chain_from(fdp: atheris.FuzzedDataProvider, head: int) -> Chain:
    return devharness.chain_from(fdp, head, 2048, lambda f: f.ConsumeIntInRange(0, 4200))


def serve(dev: VirtioDevice, host: FakeHost, fdp: atheris.FuzzedDataProvider) -> None:
    for head in range(fdp.ConsumeIntInRange(1, 12)):
        queue = fdp.ConsumeIntInRange(0, dev.num_queues - 1)
        try:
            host.offer(dev, queue, chain_from(fdp, head))
        except BackendError:
            host.stop(dev, queue)  # what the transport does: that queue is broken
            continue
        host.run_all()  # the loop finds every fd ready (level-triggered; EAGAIN is handled)


def TestOneInput(data: bytes) -> None:
    kind, fdp, host = devharness.start(data, 3)
    with tempfile.TemporaryDirectory() as tmp:
        dev: VirtioDevice
        link = None
        if kind == 0:
            link = DatagramLink()
            dev = NetDevice(link, offload=fdp.ConsumeBool())
        elif kind == 1:
            dev = VsockDevice(3, tmp)
            open_unix_listener(tmp, fdp.ConsumeIntInRange(0, 3))
        else:
            dev = ConsoleDevice(["a", "b"], tmp, console="a")
        dev.attach(host)
        dev.acked_features = fdp.ConsumeIntInRange(0, (1 << 40) - 1) & dev.features
        if link is not None:
            link.peer.setblocking(False)
            for _ in range(fdp.ConsumeIntInRange(0, 3)):
                try:
                    link.peer.send(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 2000)))
                except OSError:
                    pass
        try:
            serve(dev, host, fdp)
            dev.reset()
            serve(dev, host, fdp)
        finally:
            dev.close()


_listeners: list = []


def open_unix_listener(tmp: str, port: int) -> None:
    """A host program on port ``port`` so that some REQUESTs connect."""
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(os.path.join(tmp, f"vsock_{port}"))
    s.listen(4)
    _listeners[:] = [s]  # kept open for this input; the next input replaces it


def main() -> None:
    logging.disable(logging.CRITICAL)  # dropped-chain warnings are expected here
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
