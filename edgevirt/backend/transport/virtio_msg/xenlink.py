"""Peer mode on Xen: the bus reached through passthrough regions and a static event channel.

In a dom0less service domU nothing is a PCI device: Xen mapped the message memory and the
carve-out into this domain (``xen,reg``), and the virtio-msg bus node of its partial DTB
says where (``/passthrough/virtio-msg@…``: ``reg`` = message memory, carve-out;
``edgevirt,role = "backend"``; ``edgevirt,evtchn`` = our static event channel port). The
``ev_evtchn`` helper module (``images/xen/modules``) binds that port and gives
``/dev/ev-evtchn``: read = notification count, poll, write = notify the driver.

Both regions are mapped through ``/dev/mem``: they are no RAM to this domain, so the
kernel's STRICT_DEVMEM lets them through, and nothing else of the machine exists here.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from edgevirt.backend.transport.virtio_msg.ivshmem import drain
from edgevirt.backend.transport.virtio_msg.protocol import VirtioMsgError

log = logging.getLogger(__name__)

DT_PASSTHROUGH = Path("/proc/device-tree/passthrough")
EVTCHN_DEV = Path("/dev/ev-evtchn")
DEVMEM = Path("/dev/mem")


@dataclass(frozen=True)
class BusNode:
    """The device side's view of the bus node: where the regions are, which port."""

    path: Path
    msg: tuple[int, int]
    carveout: tuple[int, int]
    port: int


def _u32s(path: Path) -> list[int]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise VirtioMsgError(f"{path}: {e.strerror}") from e
    if len(raw) % 4:
        raise VirtioMsgError(f"{path}: {len(raw)} bytes, not whole 32-bit cells")
    return list(struct.unpack(f">{len(raw) // 4}I", raw))


def find_bus_node(root: Path = DT_PASSTHROUGH) -> BusNode:
    """The ``edgevirt,virtio-msg`` node with role ``backend`` under ``/passthrough``."""
    nodes = sorted(root.glob("virtio-msg@*")) if root.is_dir() else []
    for node in nodes:
        role = (node / "edgevirt,role").read_bytes().rstrip(b"\0") if (
            node / "edgevirt,role").exists() else b""  # fmt: skip
        if role != b"backend":
            continue
        cells = _u32s(node / "reg")  # #address-cells = #size-cells = 2 under /passthrough
        if len(cells) != 8:
            raise VirtioMsgError(
                f"{node}/reg: {len(cells)} cells, expected 8 (message memory and carve-out, "
                "2 + 2 cells each)"
            )
        pairs = [(cells[i] << 32 | cells[i + 1], cells[i + 2] << 32 | cells[i + 3])
                 for i in (0, 4)]  # fmt: skip
        port = _u32s(node / "edgevirt,evtchn")
        if len(port) != 1:
            raise VirtioMsgError(f"{node}/edgevirt,evtchn: expected one cell, got {port}")
        return BusNode(node, pairs[0], pairs[1], port[0])
    raise VirtioMsgError(
        f'no virtio-msg node with edgevirt,role = "backend" under {root} '
        f"(found {[n.name for n in nodes]}): is this the service domain?"
    )


def map_devmem(base: int, size: int, devmem: Path = DEVMEM) -> mmap.mmap:
    try:
        fd = os.open(devmem, os.O_RDWR | os.O_SYNC | os.O_CLOEXEC)
    except OSError as e:
        raise VirtioMsgError(f"{devmem}: {e.strerror} (kernel without CONFIG_DEVMEM?)") from e
    try:
        return mmap.mmap(fd, size, mmap.MAP_SHARED, offset=base)
    except OSError as e:
        raise VirtioMsgError(
            f"{devmem}: mapping [{base:#x}, {base + size:#x}) failed: {e.strerror}"
        ) from e
    finally:
        os.close(fd)


class XenEvtchnLink:
    """Message memory (a passthrough region) and doorbells (a static event channel)."""

    mode = "xen-evtchn"

    def __init__(self, node: BusNode, *, evtchn: Path = EVTCHN_DEV, devmem: Path = DEVMEM):
        self.node = node
        self.own_id = node.port
        self._map = map_devmem(*node.msg, devmem=devmem)
        self.buffer = memoryview(self._map)
        try:
            self._fd = os.open(evtchn, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            self.close()
            raise VirtioMsgError(f"{evtchn}: {e.strerror} (ev_evtchn not loaded?)") from e
        log.info("message memory [%#x, +%#x), event channel %d (%s)",
                 node.msg[0], node.msg[1], node.port, evtchn)  # fmt: skip

    def fds(self) -> list[int]:
        return [self._fd] if self._fd >= 0 else []

    def drain(self, fd: int) -> int:
        return drain(fd)

    def notify(self) -> bool:
        try:
            os.write(self._fd, b"\1")
        except OSError as e:
            log.error("event channel %d: notify failed: %s", self.node.port, e)
            return False
        return True

    def describe(self) -> dict:
        return {"mode": self.mode, "own_id": self.own_id, "evtchn": self.node.port,
                "msg": hex(self.node.msg[0]), "carveout": hex(self.node.carveout[0])}  # fmt: skip

    def close(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
        self._fd = -1
        if getattr(self, "buffer", None) is not None:
            self.buffer.release()
        if getattr(self, "_map", None) is not None:
            self._map.close()


def serve_xen(config: dict, src: str = "<config>"):  # type: ignore[no-untyped-def]
    """The service domU's back-end: bus node from the DT, carve-out through /dev/mem,
    devices from ``config`` (``{"devices": [...], "stats": path, "carveout_gpa": addr}``;
    ``carveout_gpa``, the carve-out's address in the front-end, defaults to ours)."""
    from edgevirt.backend.devices import VirtioDevice, parse_device
    from edgevirt.backend.memory import GuestMemory
    from edgevirt.backend.transport.virtio_msg.service import MsgService
    from edgevirt.errors import ConfigError

    devices_spec = config.get("devices", [])
    if not isinstance(devices_spec, list) or not all(isinstance(d, str) for d in devices_spec):
        raise ConfigError(f"{src}: field devices must be a list of device strings")
    node = find_bus_node()
    gpa = config.get("carveout_gpa", node.carveout[0])
    try:
        gpa = int(str(gpa), 0)
    except ValueError:
        raise ConfigError(f"{src}: field carveout_gpa = {gpa!r} is not an address") from None
    devices: list[VirtioDevice] = []
    mem = GuestMemory()
    link = None
    try:
        fd = os.open(DEVMEM, os.O_RDWR | os.O_SYNC | os.O_CLOEXEC)
        try:
            mem.add_file(fd, gpa, node.carveout[1], offset=node.carveout[0])
        finally:
            os.close(fd)
        devices = [parse_device(d) for d in devices_spec]
        link = XenEvtchnLink(node)
        stats = config.get("stats")
        log.info("carve-out %s (here at %#x); devices %s", mem.describe(), node.carveout[0],
                 [d.name for d in devices])  # fmt: skip
        return MsgService(devices, mem, None, Path(stats) if stats else None, None, link=link)
    except BaseException:
        for d in devices:
            d.close()
        if link is not None:
            link.close()
        mem.close()
        raise


def main(argv: list[str] | None = None) -> int:
    import json

    from edgevirt.backend.transport.virtio_msg.service import peer_main
    from edgevirt.errors import EdgevirtError

    return peer_main("python3 -m edgevirt.backend.transport.virtio_msg.xenlink", argv,
                     lambda path: serve_xen(json.loads(path.read_text()), str(path)),
                     (EdgevirtError, OSError, ValueError))  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
