"""The guest's device tree from the system-spec composer, for a QEMU virt deploy.

``edgevirt up`` hands :func:`compose_guest_dt` either the user's spec (``--spec``) or the
one :func:`default_spec` writes for the board and transport: one front-end VM, the board's
QEMU carve-out (NUMA node 1) as ``restricted-dma-pool``, and the devices the back-end
serves. For transport ``msg`` the spec's ``[msg] doorbell`` is ``"ivshmem-pci"``: QEMU's
``ivshmem-doorbell`` device provides doorbells and message memory, and the composer emits
exactly the ``edgevirt,virtio-msg`` node the guest module binds to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgevirt.board import Board
from edgevirt.deploy.qemu import QemuConfig, dump_dtb
from edgevirt.devicetree import compose as dtcompose
from edgevirt.devicetree.fdt import Fdt
from edgevirt.devicetree.system import SystemPlan, compose_system
from edgevirt.errors import ConfigError
from edgevirt.spec import (
    IVSHMEM_PCI,
    IVSHMEM_SLOT_SIZE,
    VIRTIO_IDS,
    Carveout,
    Device,
    MsgSettings,
    SystemSpec,
    Vm,
)

#: Spec transport per `up` transport.
SPEC_TRANSPORT = {"vhost-user": "mmio", "msg": "msg"}
DEFAULT_SLOTS = 64  # the message memory's slot count (virtio_msg.channel.DEFAULT_SLOTS)


@dataclass
class GuestDt:
    dtb: Path
    #: DT paths of the nodes whose DMA the carve-out pool serves (virtio-mmio or the bus).
    nodes: list[str]
    plan: SystemPlan


def default_spec(
    board: Board, transport: str, devices: list[str], *, service_vm: bool = False
) -> SystemSpec:
    """What ``up`` composes without ``--spec``: the board's QEMU topology, these devices."""
    q = board.qemu
    vms = [Vm("guest", "frontend")] + ([Vm("service", "service")] if service_vm else [])
    co = Carveout("carveout", q.carveout, q.carveout_base, 2 << 20, "restricted-dma-pool", "guest")
    kind = SPEC_TRANSPORT[transport]
    devs = tuple(
        Device(i, d, VIRTIO_IDS[d], kind, "guest", co.name, None, None)
        for i, d in enumerate(devices)
    )
    msg = MsgSettings(None, 0, DEFAULT_SLOTS, IVSHMEM_SLOT_SIZE) if kind == "msg" else None
    path = Path(f"<default spec for {board.name}, transport {transport}>")
    return SystemSpec("up", path, tuple(vms), (co,), devs, msg, None)


def check_spec_for_qemu(board: Board, spec: SystemSpec, transport: str) -> None:
    """What a QEMU virt deploy of ``spec`` needs beyond what the composer checks."""
    if len(spec.frontends) != 1:
        raise ConfigError(f"{spec.where('[[vm]]')}: `up` runs exactly one front-end VM")
    want = SPEC_TRANSPORT[transport]
    for d in spec.devices:
        w = spec.where(f"[[device]][{d.index}] ({d.type})")
        if d.transport != want:
            raise ConfigError(f"{w}: transport {d.transport!r}, but `up` runs {transport}")
        if d.node is not None or d.address is not None:
            raise ConfigError(f"{w}: node/address: QEMU chooses the virtio-mmio slots itself")
    if transport == "msg":
        assert spec.msg is not None
        m = spec.msg
        if m.doorbell is not None:
            raise ConfigError(
                f"{spec.where('[msg].doorbell')}: {m.doorbell:#x}: QEMU has no MMIO doorbell "
                f'window; on QEMU virt use doorbell = "{IVSHMEM_PCI}"'
            )
        if (m.ring_slots, m.slot_size) != (DEFAULT_SLOTS, IVSHMEM_SLOT_SIZE):
            raise ConfigError(
                f"{spec.where('[msg]')}: ring_slots {m.ring_slots}, slot_size {m.slot_size}: "
                f"the back-end lays out {DEFAULT_SLOTS} slots of {IVSHMEM_SLOT_SIZE} bytes "
                "(the guest module refuses a mismatch)"
            )


def compose_guest_dt(
    board: Board, qcfg: QemuConfig, build: Path, spec: SystemSpec, transport: str
) -> GuestDt:
    """Dump virt's DTB for this topology, compose ``spec`` onto it, write the front-end's
    ``guest.dtbo/.dts/.dtb`` and ``plan.json``."""
    check_spec_for_qemu(board, spec, transport)
    base = Fdt.from_bytes(dump_dtb(qcfg, build / "qemu-virt.raw.dtb"))
    plan = compose_system(board, base, spec)
    fe = spec.frontends[0].name
    q = board.qemu
    pools = {d.carveout for d in spec.devices}
    for p in plan.placed:
        if (
            p.kind == "carveout"
            and p.name in pools
            and (p.base, p.size)
            != (
                q.carveout_base,
                q.carveout,
            )
        ):
            raise ConfigError(
                f"{spec.where('[[carveout]]')}: carve-out {p.name!r} at {p.base:#x} size "
                f"{p.size:#x}, but {board.name} backs the carve-out NUMA node at "
                f"{q.carveout_base:#x} size {q.carveout:#x}: the back-end only sees that file"
            )
    if transport == "msg":
        nodes = [plan.msg_nodes[fe]]
    else:
        nodes = [plan.mmio[d.index] for d in spec.devices]
    dtb = Path(dtcompose.write_outputs(base, plan.overlays[fe], build, "guest")["dtb"])
    (build / "plan.json").write_text(json.dumps(plan.to_json(), indent=2))
    return GuestDt(dtb, nodes, plan)
