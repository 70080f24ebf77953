"""Peer mode: the bus reached through an ivshmem-doorbell PCI device of the VM we run in.

In the service VM nobody hands the back-end a socket or an fd: the message memory is BAR2
of an ``ivshmem-doorbell`` device (QEMU 1af4:1110; any hypervisor's shared-memory device
with a doorbell would do), mapped through sysfs (``resource2_wc``: normal non-cacheable, so
unaligned copies are fine; plain ``resource2`` is device memory, where they fault on arm64).
The host's ivshmem server wires the doorbells; the device side is one peer, the driver
another, each with a fixed ID.

Doorbells, in order of preference:

* **MSI-X** through the ``ev_ivshmem`` helper module (``images/servicevm/modules``):
  ``/dev/ivshmem-<pci address>`` reads like an eventfd (interrupt count), writes a u32 to
  the Doorbell register; our peer ID is ``/sys/bus/pci/devices/<addr>/ivposition``.
* **Polling fallback** without the helper: the bus polls the ring every ``poll_interval``;
  the driver is still rung through BAR0 mapped from sysfs ``resource0`` (a 32-bit store
  to ``Doorbell``, offset 12), and our ID is read from ``IVPosition`` (offset 8).
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from pathlib import Path
from typing import Protocol

from edgevirt.backend.transport.virtio_msg.ivshmem import drain
from edgevirt.backend.transport.virtio_msg.protocol import VirtioMsgError

log = logging.getLogger(__name__)

SYSFS = Path("/sys/bus/pci/devices")
IVSHMEM_ID = (0x1AF4, 0x1110)
REG_IVPOSITION = 8
REG_DOORBELL = 12
REGS_SIZE = 256
U32 = struct.Struct("<I")


class PeerLink(Protocol):
    """What the bus needs from peer mode: the message memory and doorbells. Implemented
    here for ivshmem PCI and in :mod:`.xenlink` for Xen passthrough + event channels."""

    buffer: memoryview
    own_id: int
    mode: str

    def fds(self) -> list[int]: ...
    def drain(self, fd: int) -> int: ...
    def notify(self) -> bool: ...
    def describe(self) -> dict: ...
    def close(self) -> None: ...


def _read_hex(path: Path) -> int:
    try:
        return int(path.read_text().strip(), 16)
    except (OSError, ValueError) as e:
        raise VirtioMsgError(f"{path}: cannot read a hex value: {e}") from e


def enable(dev: Path) -> bool:
    """Turn on memory decoding of a PCI device no driver claimed (ivshmem-plain): until then
    its BARs read as all-ones. Returns whether we had to (sysfs ``enable``)."""
    try:
        if (dev / "enable").read_text().strip() != "0":
            return False
        (dev / "enable").write_text("1")
    except OSError as e:
        raise VirtioMsgError(f"{dev}: cannot enable the PCI device: {e.strerror}") from e
    log.info("%s: PCI device enabled (memory decoding on)", dev.name)
    return True


class PciDoorbellLink:
    """Message memory and doorbells of one ivshmem-doorbell PCI device (``pci`` address)."""

    def __init__(
        self,
        pci: str,
        driver_peer: int,
        *,
        sysfs: Path = SYSFS,
        dev_dir: Path = Path("/dev"),
        vector: int = 0,
        doorbell: bool = True,
    ) -> None:
        if not 0 <= driver_peer <= 0xFFFF:
            raise VirtioMsgError(f"driver peer id {driver_peer} outside 0..65535")
        self.pci = pci
        self.driver_peer = driver_peer
        self.vector = vector
        self.dev = sysfs / pci
        ids = (_read_hex(self.dev / "vendor"), _read_hex(self.dev / "device"))
        if ids != IVSHMEM_ID:
            raise VirtioMsgError(
                f"PCI device {pci} is {ids[0]:04x}:{ids[1]:04x}, expected ivshmem "
                f"{IVSHMEM_ID[0]:04x}:{IVSHMEM_ID[1]:04x}"
            )
        enable(self.dev)
        self._fds: list[int] = []
        self._regs: mmap.mmap | None = None
        self._regs_words: memoryview | None = None
        self._map = self._map_bar("resource2_wc", "resource2")
        self.buffer = memoryview(self._map)
        try:
            node = dev_dir / f"ivshmem-{pci}"
            if doorbell and node.exists():
                self._fds = [os.open(node, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)]
                self.own_id = int((self.dev / "ivposition").read_text())
                self.mode = "msi-x"
            else:
                self._regs = self._map_bar("resource0")
                self._regs_words = memoryview(self._regs).cast("I")
                self.own_id = self._regs_words[REG_IVPOSITION // 4]
                self.mode = "polling"
                log.warning("%s: no %s (ev_ivshmem not loaded?): polling the ring", pci, node)
        except (OSError, ValueError) as e:
            self.close()
            raise VirtioMsgError(f"PCI device {pci}: doorbell setup failed: {e}") from e
        if not 0 <= self.own_id <= 0xFFFF:
            self.close()
            raise VirtioMsgError(f"PCI device {pci}: our peer id {self.own_id} is out of range")
        log.info(
            "%s: message memory %#x bytes, peer %d, driver peer %d, %s",
            pci, len(self.buffer), self.own_id, driver_peer, self.mode,
        )  # fmt: skip

    def _map_bar(self, *names: str) -> mmap.mmap:
        for name in names:
            path = self.dev / name
            if not path.exists():
                continue
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as e:
                raise VirtioMsgError(f"{path}: {e.strerror}") from e
            try:
                size = os.fstat(fd).st_size
                if size <= 0:
                    raise VirtioMsgError(f"{path}: BAR of size {size}")
                return mmap.mmap(fd, size, mmap.MAP_SHARED)
            except OSError as e:
                raise VirtioMsgError(f"{path}: mmap failed: {e.strerror}") from e
            finally:
                os.close(fd)
        raise VirtioMsgError(f"PCI device {self.pci}: none of {', '.join(names)} in {self.dev}")

    def fds(self) -> list[int]:
        """Readable when the driver rang us (empty in polling mode)."""
        return list(self._fds)

    def drain(self, fd: int) -> int:
        return drain(fd)

    def notify(self) -> bool:
        """Ring the driver's ``vector``."""
        value = self.driver_peer << 16 | self.vector
        try:
            if self._fds:
                os.write(self._fds[0], U32.pack(value))
            elif self._regs_words is not None:
                self._regs_words[REG_DOORBELL // 4] = value  # one aligned 32-bit store
            else:
                return False
        except OSError as e:
            log.error("%s: doorbell write failed: %s", self.pci, e)
            return False
        return True

    def describe(self) -> dict:
        return {
            "pci": self.pci,
            "mode": self.mode,
            "own_id": self.own_id,
            "driver_peer": self.driver_peer,
        }

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if getattr(self, "buffer", None) is not None:
            self.buffer.release()
        if self._regs_words is not None:
            self._regs_words.release()
            self._regs_words = None
        if self._regs is not None:
            self._regs.close()
            self._regs = None
        if getattr(self, "_map", None) is not None:
            self._map.close()
