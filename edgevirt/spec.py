"""The system spec (TOML): VMs, carve-outs and virtio devices with their transport.

Validated with messages that name the file, the key and what was expected. Example::

    name = "guest-and-service"

    [[vm]]
    name = "guest"        # front-end: its virtio devices are confined to a carve-out
    role = "frontend"
    [[vm]]
    name = "service"      # runs the back-end: gets a no-map node for each carve-out
    role = "service"

    [[carveout]]
    name = "shared"
    size = "64M"
    placement = "auto"    # or a fixed address such as 0x5c000000
    align = "2M"          # default 2M; at least 4K (the kernel's page)
    pool = "restricted-dma-pool"   # or "shared-dma-pool"

    backend = "host"      # `edgevirt up`: "host" or "service-vm" (default: host)

    [msg]                 # only needed when a device uses transport "msg"
    doorbell = 0x0c000000 # MMIO window the front-end writes to notify the back-end, and
                          # the rings at the top of the carve-out; or "ivshmem-pci": an
                          # ivshmem-doorbell PCI device brings doorbells (register, MSI-X)
                          # and the message memory (BAR2; layout in PROTOCOL.md)
    ring_slots = 64       # message slots per direction
    slot_size = 64        # bytes per slot (ivshmem-pci: 264, the message memory's slot)

    [[device]]
    type = "blk"          # blk, net, rng, console, gpio, i2c, vsock, … or id = <n>
    transport = "mmio"    # a virtio-mmio node trapped by a VMM …
    [[device]]
    type = "rng"
    transport = "msg"     # … or message passing over shared memory + doorbell
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevirt.board import check_keys, get_key, parse_address, parse_size, read_toml
from edgevirt.errors import ConfigError

__all__ = [
    "BACKENDS",
    "Carveout",
    "Device",
    "IVSHMEM_PCI",
    "IVSHMEM_SLOT_SIZE",
    "MsgSettings",
    "SystemSpec",
    "Vm",
    "VIRTIO_IDS",
    "load_spec",
]

#: Virtio device IDs (virtio spec §5 "Device Types").
VIRTIO_IDS = {
    "net": 1,
    "blk": 2,
    "console": 3,
    "rng": 4,
    "balloon": 5,
    "scsi": 8,
    "9p": 9,
    "gpu": 16,
    "input": 18,
    "vsock": 19,
    "crypto": 20,
    "sound": 25,
    "fs": 26,
    "scmi": 32,
    "i2c": 34,
    "gpio": 41,
}
POOLS = ("restricted-dma-pool", "shared-dma-pool")
TRANSPORTS = ("mmio", "msg")
ROLES = ("frontend", "service")
BACKENDS = ("host", "service-vm")
#: ``[msg] doorbell`` value for the ivshmem-doorbell PCI device (QEMU; a hypervisor with an
#: equivalent shared-memory + doorbell device): no MMIO window, no ring in the carve-out.
IVSHMEM_PCI = "ivshmem-pci"
#: Slot size of the ivshmem message memory: 8-byte virtio-msg header + the largest payload
#: (edgevirt.backend.transport.virtio_msg.channel.SLOT_SIZE; PROTOCOL.md).
IVSHMEM_SLOT_SIZE = 264
PAGE = 0x1000
_NAME = re.compile(r"[a-z][a-z0-9_]{0,30}\Z")


@dataclass(frozen=True)
class Vm:
    name: str
    role: str  # frontend | service


@dataclass(frozen=True)
class Carveout:
    name: str
    size: int
    placement: int | None  # None = "auto"
    align: int
    pool: str
    vm: str  # the front-end VM whose devices use it

    @property
    def label(self) -> str:
        return f"edgevirt_{self.name}"


@dataclass(frozen=True)
class MsgSettings:
    doorbell: int | None  # the MMIO doorbell window; None with ivshmem-pci
    doorbell_size: int
    ring_slots: int
    slot_size: int

    @property
    def mode(self) -> str:
        """``mmio`` (doorbell window + ring in the carve-out) or ``ivshmem-pci``."""
        return IVSHMEM_PCI if self.doorbell is None else "mmio"

    @property
    def ring_bytes(self) -> int:
        """Two rings (to and from the back-end), each a 64-byte header + slots, page-rounded;
        0 with ivshmem-pci (the message memory is the PCI device's BAR, not carve-out)."""
        if self.doorbell is None:
            return 0
        raw = 2 * (64 + self.ring_slots * self.slot_size)
        return (raw + PAGE - 1) & ~(PAGE - 1)


@dataclass(frozen=True)
class Device:
    index: int
    type: str
    virtio_id: int
    transport: str
    vm: str
    carveout: str
    node: str | None  # mmio: an existing virtio,mmio node (path)
    address: int | None  # mmio: a new node at this address (real boards, VMM-trapped)


@dataclass(frozen=True)
class SystemSpec:
    name: str
    path: Path
    vms: tuple[Vm, ...]
    carveouts: tuple[Carveout, ...]
    devices: tuple[Device, ...]
    msg: MsgSettings | None
    backend: str | None = None  # where `edgevirt up` runs the back-end (BACKENDS)

    @property
    def transports(self) -> list[str]:
        """The device transports in use, in spec order, each once."""
        return list(dict.fromkeys(d.transport for d in self.devices))

    def where(self, what: str) -> str:
        return f"{self.path}: {what}"

    @property
    def frontends(self) -> list[Vm]:
        return [v for v in self.vms if v.role == "frontend"]

    @property
    def services(self) -> list[Vm]:
        return [v for v in self.vms if v.role == "service"]


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigError(
            f"{where}: expected a name of lower-case letters, digits and _ "
            f"(starting with a letter, at most 31), got {value!r}"
        )
    return value


def _tables(data: dict[str, Any], key: str, f: str) -> list[dict[str, Any]]:
    value = data.get(key, [])
    if isinstance(value, dict):  # a single [key] table is accepted as a list of one
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"{f}: [[{key}]]: expected tables")
    return value


def _power_of_two(value: int, where: str) -> int:
    if value < PAGE or value & (value - 1):
        raise ConfigError(f"{where}: expected a power of two >= {PAGE:#x}, got {value:#x}")
    return value


def load_spec(path: str | Path) -> SystemSpec:
    p = Path(path)
    f = str(p)
    data = read_toml(p, "system spec")
    check_keys(data, {"name", "vm", "carveout", "device", "msg", "backend"}, f)
    name = get_key(data, "name", str, f, p.stem)
    backend = get_key(data, "backend", str, f, None)
    if backend is not None and backend not in BACKENDS:
        raise ConfigError(f"{f}: backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")

    vms: list[Vm] = []
    for i, t in enumerate(_tables(data, "vm", f)):
        w = f"{f}: [[vm]][{i}]"
        check_keys(t, {"name", "role"}, w)
        vm = Vm(_name(get_key(t, "name", str, w), f"{w}.name"), get_key(t, "role", str, w))
        if vm.role not in ROLES:
            raise ConfigError(f"{w}.role: expected one of {', '.join(ROLES)}, got {vm.role!r}")
        if any(v.name == vm.name for v in vms):
            raise ConfigError(f"{w}.name: VM {vm.name!r} is defined twice")
        vms.append(vm)
    if not vms:
        vms = [Vm("guest", "frontend")]
    frontends = [v.name for v in vms if v.role == "frontend"]
    if not frontends:
        raise ConfigError(f"{f}: [[vm]]: expected at least one VM with role = 'frontend'")

    def frontend_ref(t: dict[str, Any], w: str) -> str:
        vm = get_key(t, "vm", str, w, frontends[0] if len(frontends) == 1 else ...)
        if vm not in frontends:
            raise ConfigError(
                f"{w}.vm: expected a front-end VM ({', '.join(frontends)}), got {vm!r}"
            )
        return str(vm)

    carveouts: list[Carveout] = []
    for i, t in enumerate(_tables(data, "carveout", f)):
        w = f"{f}: [[carveout]][{i}]"
        check_keys(t, {"name", "size", "placement", "align", "pool", "vm"}, w)
        placement = t.get("placement", "auto")
        pool = get_key(t, "pool", str, w, "restricted-dma-pool")
        if pool not in POOLS:
            raise ConfigError(f"{w}.pool: expected one of {', '.join(POOLS)}, got {pool!r}")
        c = Carveout(
            name=_name(get_key(t, "name", str, w, "carveout" if i == 0 else ...), f"{w}.name"),
            size=parse_size(get_key(t, "size", (str, int), w), f"{w}.size"),
            placement=None
            if placement == "auto"
            else parse_address(placement, f'{w}.placement (or "auto")'),
            align=_power_of_two(
                parse_size(get_key(t, "align", (str, int), w, "2M"), f"{w}.align"), f"{w}.align"
            ),
            pool=pool,
            vm=frontend_ref(t, w),
        )
        if c.size % c.align:
            raise ConfigError(f"{w}.size: {c.size:#x} is not a multiple of align {c.align:#x}")
        if c.placement is not None and c.placement % c.align:
            raise ConfigError(
                f"{w}.placement: {c.placement:#x} is not aligned to align {c.align:#x}"
            )
        if any(o.name == c.name for o in carveouts):
            raise ConfigError(f"{w}.name: carve-out {c.name!r} is defined twice")
        carveouts.append(c)
    if not carveouts:
        raise ConfigError(f"{f}: expected at least one [[carveout]] (size, placement)")

    devices: list[Device] = []
    for i, t in enumerate(_tables(data, "device", f)):
        w = f"{f}: [[device]][{i}]"
        check_keys(t, {"type", "id", "transport", "vm", "carveout", "node", "address"}, w)
        dtype = get_key(t, "type", str, w)
        vid = get_key(t, "id", int, w, VIRTIO_IDS.get(dtype))
        if vid is None or not 0 < vid < 0x10000:
            raise ConfigError(
                f"{w}.type: unknown virtio device {dtype!r}; expected one of "
                f"{', '.join(VIRTIO_IDS)} or an explicit id = <virtio device ID>"
            )
        transport = get_key(t, "transport", str, w)
        if transport not in TRANSPORTS:
            raise ConfigError(f"{w}.transport: expected 'mmio' or 'msg', got {transport!r}")
        dvm = frontend_ref(t, w)
        mine = [c.name for c in carveouts if c.vm == dvm]
        co = get_key(t, "carveout", str, w, mine[0] if mine else ...)
        if co not in mine:
            raise ConfigError(
                f"{w}.carveout: expected a carve-out of VM {dvm!r} ({', '.join(mine) or 'none'})"
                f", got {co!r}"
            )
        node = get_key(t, "node", str, w, None)
        addr = t.get("address")
        if transport == "msg" and (node is not None or addr is not None):
            raise ConfigError(f"{w}: node/address apply to transport 'mmio' only")
        if node is not None and addr is not None:
            raise ConfigError(f"{w}: give node (existing) or address (new node), not both")
        devices.append(
            Device(
                index=i,
                type=dtype,
                virtio_id=vid,
                transport=transport,
                vm=dvm,
                carveout=co,
                node=node,
                address=None if addr is None else parse_address(addr, f"{w}.address"),
            )
        )

    msg = None
    m = data.get("msg")
    if m is not None:
        w = f"{f}: [msg]"
        if not isinstance(m, dict):
            raise ConfigError(f"{w}: expected a table")
        check_keys(m, {"doorbell", "doorbell_size", "ring_slots", "slot_size"}, w)
        raw_db = get_key(m, "doorbell", (int, str), w)
        pci = raw_db == IVSHMEM_PCI
        if pci and "doorbell_size" in m:
            raise ConfigError(f"{w}.doorbell_size: no doorbell window with {IVSHMEM_PCI!r}")
        msg = MsgSettings(
            doorbell=None
            if pci
            else parse_address(raw_db, f'{w}.doorbell (an address or "{IVSHMEM_PCI}")'),
            doorbell_size=0
            if pci
            else parse_size(m.get("doorbell_size", PAGE), f"{w}.doorbell_size"),
            ring_slots=get_key(m, "ring_slots", int, w, 64),
            slot_size=get_key(m, "slot_size", int, w, IVSHMEM_SLOT_SIZE if pci else 64),
        )
        if not 1 <= msg.ring_slots <= 4096 or msg.ring_slots & (msg.ring_slots - 1):
            raise ConfigError(f"{w}.ring_slots: expected a power of two in 1..4096")
        if msg.slot_size < 40 or msg.slot_size % 8 or msg.slot_size > 4096:
            # 40: 8-byte header + SET_VQUEUE payload (index, size, three u64 addresses)
            raise ConfigError(f"{w}.slot_size: expected a multiple of 8 in 40..4096")
        if msg.doorbell is not None and msg.doorbell % PAGE:
            raise ConfigError(f"{w}.doorbell: {msg.doorbell:#x} is not {PAGE:#x}-aligned")
    if any(d.transport == "msg" for d in devices) and msg is None:
        raise ConfigError(f"{f}: devices with transport 'msg' need a [msg] table (doorbell)")
    return SystemSpec(name, p, tuple(vms), tuple(carveouts), tuple(devices), msg, backend)
