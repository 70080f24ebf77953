"""The virtio-msg back-end as it runs inside the service VM (peer mode).

``python3 -m edgevirt.servicevm.peer --config /etc/edgevirt/service.json``, started by the
service VM's ``/init``. Everything comes from PCI devices of this VM: the carve-out is BAR2
of an ``ivshmem-plain`` device (the same file the front-end VM has as its carve-out NUMA
node), the message memory and doorbells are an ``ivshmem-doorbell`` device (see
:mod:`edgevirt.backend.transport.virtio_msg.pcilink`). The configuration (JSON)::

    {"carveout": {"pci": "0000:00:04.0", "base": "0x5c000000", "size": 67108864},
     "msg": {"pci": "0000:00:05.0", "driver_peer": 2, "nslots": 64, "doorbell": true},
     "devices": ["blk:path=/dev/vda", "rng"],
     "stats": "/run/edgevirt/stats.json", "poll_interval": null,
     "peripherals": {"gpio_sim": {"label": "ev-gpio", "lines": ["led"]}}}

``peripherals`` (optional) are kernel-emulated peripherals made before the devices open
(:mod:`edgevirt.servicevm.peripherals`).

``base`` is the carve-out's guest-physical address *in the front-end VM*: the addresses in
its virtqueues are translated against it. Logs go to stderr (``/init`` sends them to
``/run/edgevirt/backend.log``).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edgevirt.backend.devices import VirtioDevice, parse_device
from edgevirt.backend.transport.virtio_msg.channel import DEFAULT_SLOTS
from edgevirt.backend.transport.virtio_msg.pcilink import (
    IVSHMEM_ID,
    SYSFS,
    PciDoorbellLink,
    enable,
)
from edgevirt.backend.transport.virtio_msg.service import MsgService, map_carveout, peer_main
from edgevirt.errors import ConfigError
from edgevirt.servicevm import peripherals

log = logging.getLogger(__name__)

_PCI = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")


@dataclass
class PeerConfig:
    carveout_pci: str
    carveout_base: int
    msg_pci: str
    driver_peer: int
    carveout_size: int | None = None
    nslots: int = DEFAULT_SLOTS
    doorbell: bool = True
    devices: list[str] = field(default_factory=list)
    stats: str | None = None
    poll_interval: float | None = None
    peripherals: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            **({"peripherals": self.peripherals} if self.peripherals else {}),
            "carveout": {
                "pci": self.carveout_pci,
                "base": hex(self.carveout_base),
                "size": self.carveout_size,
            },
            "msg": {
                "pci": self.msg_pci,
                "driver_peer": self.driver_peer,
                "nslots": self.nslots,
                "doorbell": self.doorbell,
            },
            "devices": list(self.devices),
            "stats": self.stats,
            "poll_interval": self.poll_interval,
        }


def _get(src: str, d: object, key: str, kind: type | tuple[type, ...], where: str) -> object:
    if not isinstance(d, dict) or key not in d:
        raise ConfigError(f"{src}: missing field {where}{key}")
    value = d[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{src}: field {where}{key} = {value!r} has the wrong type")
    return value


def _int(src: str, value: object, name: str) -> int:
    try:
        return value if isinstance(value, int) else int(str(value), 0)
    except ValueError:
        raise ConfigError(f"{src}: field {name} = {value!r} is not an integer") from None


def _pci(src: str, value: object, name: str) -> str:
    if not isinstance(value, str) or not _PCI.fullmatch(value):
        raise ConfigError(f"{src}: field {name} = {value!r} is not a PCI address like 0000:00:04.0")
    return value


def parse_config(data: dict, src: str = "<config>") -> PeerConfig:
    co = _get(src, data, "carveout", dict, "")
    msg = _get(src, data, "msg", dict, "")
    assert isinstance(co, dict) and isinstance(msg, dict)
    size = co.get("size")
    devices = data.get("devices", [])
    if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
        raise ConfigError(f"{src}: field devices must be a list of device strings")
    poll = data.get("poll_interval")
    if poll is not None and not (isinstance(poll, int | float) and 0 < poll <= 1):
        raise ConfigError(f"{src}: field poll_interval = {poll!r}: expected 0 < seconds <= 1")
    return PeerConfig(
        carveout_pci=_pci(src, co.get("pci"), "carveout.pci"),
        carveout_base=_int(src, _get(src, co, "base", (int, str), "carveout."), "carveout.base"),
        carveout_size=None if size is None else _int(src, size, "carveout.size"),
        msg_pci=_pci(src, msg.get("pci"), "msg.pci"),
        driver_peer=_int(src, _get(src, msg, "driver_peer", int, "msg."), "msg.driver_peer"),
        nslots=_int(src, msg.get("nslots", DEFAULT_SLOTS), "msg.nslots"),
        doorbell=bool(msg.get("doorbell", True)),
        devices=list(devices),
        stats=data.get("stats"),
        poll_interval=poll,
        peripherals=peripherals.check(data.get("peripherals"), src),
    )


def load_config(path: Path) -> PeerConfig:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from e
    except ValueError as e:
        raise ConfigError(f"{path}: not JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return parse_config(data, str(path))


def _read_id(dev: Path) -> tuple[int, int]:
    try:
        return (int((dev / "vendor").read_text(), 16), int((dev / "device").read_text(), 16))
    except (OSError, ValueError) as e:
        raise ConfigError(f"PCI device {dev}: cannot read its vendor/device ID: {e}") from e


def serve(cfg: PeerConfig, sysfs: Path = SYSFS, dev_dir: Path = Path("/dev")) -> MsgService:
    """Map the carve-out BAR, attach the doorbell device, build the service (not yet run)."""
    devices: list[VirtioDevice] = []
    mem = None
    link = None
    try:
        bars = sysfs / cfg.carveout_pci
        if _read_id(bars) != IVSHMEM_ID:
            raise ConfigError(f"carve-out device {cfg.carveout_pci} is not ivshmem ({bars})")
        enable(bars)  # nobody drives ivshmem-plain: memory decoding is off until we ask
        mem = map_carveout(bars / "resource2_wc", cfg.carveout_base, cfg.carveout_size)
        if cfg.peripherals:
            peripherals.setup(cfg.peripherals)
        for spec in cfg.devices:
            devices.append(parse_device(spec))
        link = PciDoorbellLink(
            cfg.msg_pci, cfg.driver_peer, sysfs=sysfs, dev_dir=dev_dir, doorbell=cfg.doorbell
        )
        stats = Path(cfg.stats) if cfg.stats else None
        log.info("carve-out %s; devices %s", mem.describe(), [d.name for d in devices])
        return MsgService(devices, mem, None, stats, cfg.poll_interval, link=link)
    except BaseException:
        for d in devices:
            d.close()
        if link is not None:
            link.close()
        if mem is not None:
            mem.close()
        raise


def main(argv: Sequence[str] | None = None) -> int:
    return peer_main("python3 -m edgevirt.servicevm.peer", argv,
                     lambda path: serve(load_config(path)))  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
