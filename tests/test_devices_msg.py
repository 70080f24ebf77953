"""The deferred-completion path over virtio-msg: net and vsock behind a real MsgBus, driven
by the Python driver (ivshmem protocol, shared carve-out, EVENT_AVAIL/EVENT_USED)."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgevirt.backend.devices.net import F_MRG_RXBUF, NetDevice
from edgevirt.backend.devices.tap import DatagramLink
from edgevirt.backend.devices.vsock import HDR, OP_REQUEST, OP_RST, VsockDevice
from edgevirt.backend.loop import Loop
from edgevirt.backend.transport.virtio_msg import protocol as p
from edgevirt.backend.transport.virtio_msg.bus import MsgBus
from edgevirt.backend.transport.virtio_msg.driver import MsgDriver
from edgevirt.backend.transport.virtio_msg.service import map_carveout
from edgevirt.backend.virtq.driver import DriverQueue
from tests.helpers import wait_until

BASE = 0x5C00_0000
CARVEOUT = 4 << 20
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[tuple[MsgDriver, object, NetDevice, DatagramLink]]:
    carve_file = tmp_path / "carveout"
    with open(carve_file, "wb") as f:
        f.truncate(CARVEOUT)
    mem = map_carveout(carve_file, BASE)
    carve = map_carveout(carve_file, BASE)
    loop = Loop()
    link = DatagramLink()
    net = NetDevice(link, offload=False)
    vsock = VsockDevice(3, tmp_path / "vs")
    b = MsgBus([net, vsock], mem, loop, socket_path=str(tmp_path / "iv.sock"))
    t = threading.Thread(target=loop.run, daemon=True)
    t.start()
    drv = MsgDriver(str(tmp_path / "iv.sock"), carve)
    yield drv, carve, net, link
    drv.close()
    loop.stop()
    t.join(5)
    b.close()
    mem.close()
    carve.close()
    loop.close()


def ready(drv: MsgDriver, dev: int, features: int, queues: list[DriverQueue]) -> None:
    want = features | 1 << F_VERSION_1 | 1 << F_ACCESS_PLATFORM
    assert drv.negotiate(dev, want) & p.STATUS_FEATURES_OK
    for i, q in enumerate(queues):
        drv.setup_queue(dev, i, q)
    assert drv.driver_ok(dev) & p.STATUS_DRIVER_OK


def test_net_rx_completes_later_with_event_used(bus) -> None:  # type: ignore[no-untyped-def]
    drv, carve, net, link = bus
    rx = DriverQueue(carve, 16, base=BASE)
    rx.data_end = BASE + (1 << 20)
    tx = DriverQueue(carve, 16, base=BASE + (1 << 20))
    tx.data_end = BASE + (2 << 20)
    ready(drv, 0, 1 << F_MRG_RXBUF, [rx, tx])
    head = rx.add([], [1600])
    gpa = rx.read_desc(head)[0]
    drv.kick(0, 0)
    assert wait_until(lambda: len(net.rx) == 1) and rx.get_used() == []
    frame = bytes(12) + b"\x5a" * 1000
    link.peer.send(frame)
    drv.wait_used(0, 0, 5)
    [(h, n)] = rx.get_used()
    data = rx.read(gpa, n)
    assert h == head and n == len(frame) and data[12:] == frame[12:]
    assert struct.unpack_from("<H", data, 10)[0] == 1


def test_reset_drops_deferred_chains(bus) -> None:  # type: ignore[no-untyped-def]
    drv, carve, net, link = bus
    rx = DriverQueue(carve, 16, base=BASE)
    rx.data_end = BASE + (1 << 20)
    tx = DriverQueue(carve, 16, base=BASE + (1 << 20))
    ready(drv, 0, 0, [rx, tx])
    rx.add([], [1600])
    drv.kick(0, 0)
    assert wait_until(lambda: len(net.rx) == 1)
    drv.set_status(0, 0)  # the driver resets the device: the chain is no longer ours
    assert wait_until(lambda: len(net.rx) == 0)
    link.peer.send(bytes(12) + b"x" * 100)
    time.sleep(0.2)
    assert rx.get_used() == [] and net.stats.by_type.get("rx_frames", 0) == 0


def test_vsock_rst_for_closed_port_over_msg(bus) -> None:  # type: ignore[no-untyped-def]
    drv, carve, _, _ = bus
    qs = [DriverQueue(carve, 16, base=BASE + (i + 1) * (1 << 20)) for i in range(3)]
    for i, q in enumerate(qs):
        q.data_end = BASE + (i + 2) * (1 << 20)
    ready(drv, 1, 0, qs)
    head = qs[0].add([], [4096 + 44])
    gpa = qs[0].read_desc(head)[0]
    drv.kick(1, 0)
    qs[1].add([HDR.pack(3, 2, 1234, 9999, 0, 1, OP_REQUEST, 0, 65536, 0)])
    drv.kick(1, 1)
    drv.wait_used(1, 0, 5)
    [(h, n)] = qs[0].get_used()
    hdr = HDR.unpack(qs[0].read(gpa, 44))
    assert h == head and n == 44 and hdr[6] == OP_RST and (hdr[2], hdr[3]) == (9999, 1234)
