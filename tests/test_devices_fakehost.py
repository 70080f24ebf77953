"""FakeHost: devices tested without a transport, and the completion rules it enforces."""

import pytest

from edgevirt.backend.devices.base import DEFERRED, Chain, VirtioDevice
from edgevirt.backend.devices.fakehost import CompletionError, FakeHost
from edgevirt.backend.devices.net import RX, NetDevice
from edgevirt.backend.devices.tap import DatagramLink
from edgevirt.backend.memory import GuestMemory, Region

GPA = 0x5C000000


@pytest.fixture
def host():
    return FakeHost(GuestMemory([Region(GPA, 1 << 16, bytearray(1 << 16))]))


def test_net_rx_through_the_fake_host(host):
    link = DatagramLink()
    dev = NetDevice(link, offload=False)
    dev.attach(host)
    assert host.offer(dev, RX, Chain(7, [], [(GPA, 1600)])) == DEFERRED
    assert host.completed == [] and link.fd in host.readers
    link.peer.send(bytes(12) + b"\xab" * 100)
    assert host.poll(2) == 1
    assert host.completed == [(RX, 7, 112)]
    assert bytes(host.mem.translate(GPA + 12, 100)) == b"\xab" * 100
    dev.close()


class Sloppy(VirtioDevice):
    """Completes whatever it is told to, however wrong."""

    num_queues = 2

    def handle(self, queue, chain, mem):
        self.last = chain
        return DEFERRED


@pytest.mark.parametrize(
    "misdeed, message",
    [
        (lambda h, d, c: h.complete(0, [(c, 1), (c, 1)]), "not held"),  # twice
        (lambda h, d, c: h.complete(0, [(c, 999)]), "used 999 outside 0..16"),
        (lambda h, d, c: h.complete(1, [(c, 1)]), "of queue 0 completed on queue 1"),
        (lambda h, d, c: h.complete(0, [(Chain(9, [], [(GPA, 4)]), 1)]), "not held"),
    ],
)
def test_completion_rules_are_enforced(host, misdeed, message):
    dev = Sloppy()
    dev.attach(host)
    chain = Chain(3, [], [(GPA, 16)])
    host.offer(dev, 0, chain)
    with pytest.raises(CompletionError, match=message):
        misdeed(host, dev, chain)


def test_stop_forgets_held_chains(host):
    dev = Sloppy()
    dev.attach(host)
    chain = Chain(3, [], [(GPA, 16)])
    host.offer(dev, 0, chain)
    host.stop(dev, 0)
    with pytest.raises(CompletionError, match="not held"):
        host.complete(0, [(chain, 1)])
