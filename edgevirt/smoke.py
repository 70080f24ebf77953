"""The smoke suite `edgevirt up` runs, and the host-side checks that go with it.

The guest-side checks are data: ``edgevirt/suites/smoke.yaml``, the same file
``edgevirt test smoke --board B`` runs, for every transport: its pool step is
parameterised by the nodes the carve-out pool serves (``${pool_users}``: virtio-mmio
nodes, or the virtio-msg bus node). The host-side checks (disk image contents, back-end
counters, the virtio-msg bus as the guest logged it) need the host and live here, one set
for every transport and back-end placement.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from edgevirt.suite.model import Suite, load_suite

DISK_TEST_BYTES = 8 << 20
#: The step whose output carries the guest's sha256 of the data it wrote to /dev/vda.
DISK_STEP = "blk write/read-back"
#: The step whose output carries the kernel's pool and virtio-msg lines.
POOL_STEP = "restricted DMA pool"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def smoke_suite() -> Suite:
    return load_suite("smoke")


def pool_user(path: str) -> str:
    """The kernel's device name for the DT node at ``path`` (what it logs the pool
    assignment under): ``/virtio_mmio@a003e00`` → ``a003e00.virtio_mmio``,
    ``/virtio-msg`` → ``virtio-msg``."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    stem, at, unit = name.partition("@")
    return f"{unit}.{stem}" if at else stem


def smoke_vars(carveout_base: int, carveout_size: int, nodes: list[str]) -> dict[str, str]:
    return {
        "carveout_base": f"{carveout_base:x}",
        "carveout_size": str(carveout_size),
        "carveout_mib": str(carveout_size >> 20),
        "virtio_nodes": " ".join(sorted(n.rsplit("@", 1)[-1] for n in nodes if "@" in n)),
        "pool_users": " ".join(sorted(pool_user(n) for n in nodes)),
    }


# -- host side --------------------------------------------------------------------------------


def disk_check(disk: Path, guest_output: str | None, name: str = "disk image on host") -> Check:
    """The host's sha256 of the disk's first 8 MiB equals what the guest wrote."""
    hashes = re.findall(r"^([0-9a-f]{64})\b", guest_output or "", re.M)
    with open(disk, "rb") as f:
        host = hashlib.sha256(f.read(DISK_TEST_BYTES)).hexdigest()
    ok = bool(hashes) and hashes[0] == host
    verdict = "matches the guest" if ok else "differs from the guest"
    return Check(name, ok, f"host sha256 of first 8 MiB {host[:16]}… {verdict}")


def backend_checks(stats: dict, carveout: int, prefix: str = "") -> list[Check]:
    """Per device: mapped exactly the carve-out, served requests, refused and broke nothing;
    for the virtio-msg bus also its protocol counters."""
    checks = []
    devs = stats.get("devices", [])
    for d in devs:
        mapped, refused = d.get("mapped_bytes", 0), d.get("refused", 0)
        broken = d.get("broken")
        ok = mapped == carveout and refused == 0 and d.get("requests", 0) > 0 and not broken
        dev = f" (dev {d['dev_num']})" if "dev_num" in d else ""
        checks.append(
            Check(
                f"{prefix}back-end {d.get('device')}{dev}",
                ok,
                f"mapped {mapped:#x} bytes (carve-out {carveout:#x}), {d.get('requests', 0)} "
                f"requests, {refused} refused" + (f", broken: {broken}" if broken else ""),
            )
        )
    if not devs:
        checks.append(Check(f"{prefix}back-end", False, "no statistics from the back-end"))
    if "messages_in" in stats:
        errors = stats.get("protocol_errors", 0)
        detail = (
            f"{stats.get('messages_in', 0)} messages in, {stats.get('messages_out', 0)} out, "
            f"{errors} discarded, {stats.get('dropped', 0)} dropped"
        )
        checks.append(Check(f"{prefix}virtio-msg protocol", errors == 0, detail))
    return checks


def msg_bus_check(pool_output: str, device_count: int, prefix: str = "") -> Check:
    """From the pool step's kernel lines: the bus registered every device, over MSI-X."""
    devices = re.findall(r"virtio-msg: device (\d+): virtio id (\d+)", pool_output)
    if len(devices) != device_count:
        return Check(
            f"{prefix}virtio-msg bus",
            False,
            f"registered {devices or 'no devices'}, expected {device_count} devices",
        )
    if "MSI-X" not in pool_output:
        return Check(f"{prefix}virtio-msg bus", False, "virtio-msg bus is not using MSI-X")
    listed = ", ".join(f"{n}=id {i}" for n, i in devices)
    return Check(f"{prefix}virtio-msg bus", True, f"devices {listed} over MSI-X")
