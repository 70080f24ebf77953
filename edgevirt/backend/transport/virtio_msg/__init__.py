"""virtio-msg transport: virtio devices served over message memory and ivshmem doorbells.

:mod:`.protocol` is the wire format, :mod:`.channel` the message memory (a ring per
direction), :mod:`.ivshmem` the ivshmem server protocol, :mod:`.pcilink` peer mode (an ivshmem PCI
device of the VM the back-end runs in), :mod:`.device` the per-device
transport, :mod:`.bus` the device side of one bus, :mod:`.service` the back-end process and
:mod:`.driver` a driver-side peer in Python for tests. PROTOCOL.md is the contract with the
guest kernel module (``images/modules/virtio_msg``).
"""
