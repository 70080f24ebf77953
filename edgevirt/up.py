"""`edgevirt up`: what every platform shares, and the QEMU platform's back-end placements.

:func:`up` runs the platform ``UpOptions.platform`` names (:mod:`edgevirt.platforms`: QEMU
virt in :mod:`~edgevirt.platforms.qemu_virt`, Xen dom0less in
:mod:`~edgevirt.platforms.xen_dom0less`); each reports one :class:`UpResult`.

On QEMU two choices are strategies:

* **transport** — ``vhost-user`` (vhost-user devices on virt's virtio-mmio bus) or ``msg``
  (virtio-msg over an ``ivshmem-doorbell`` PCI device; the guest's ``virtio_msg`` module
  binds to the composer's ``edgevirt,virtio-msg`` node), resolved by :func:`resolve`.
* **back-end placement** — :class:`HostBackend` (a process on the host that the machine
  starts: ``edgevirt backend run`` or the virtio-msg bus server) or
  :class:`edgevirt.servicevm.up.ServiceVmBackend` (the back-end inside an aarch64 service
  VM; the host only owns the shared files and wires the doorbells).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgevirt import devsmoke
from edgevirt.board import Board
from edgevirt.console.expect import Console
from edgevirt.deploy.backend_process import BackendProcess, backend_socket
from edgevirt.deploy.machine import QemuMachine, build_initramfs, compose_dtb
from edgevirt.deploy.system_dt import default_spec
from edgevirt.errors import ConfigError
from edgevirt.report import Reporter
from edgevirt.smoke import (
    Check,
    backend_checks,
    disk_check,
)
from edgevirt.spec import SystemSpec, load_spec

__all__ = [
    "BackendProcess",
    "HostBackend",
    "Placement",
    "UpOptions",
    "UpResult",
    "backend_socket",
    "build_initramfs",
    "compose_dtb",
    "up",
]

log = logging.getLogger(__name__)

TRANSPORTS = ("vhost-user", "msg")
BACKENDS = ("host", "service-vm")
#: The devices the edgevirt back-end serves and the smoke suite checks, in dev_num order.
DEVICES = ("blk", "rng")
#: ``workload(console, abort)`` runs on the front-end after a passing smoke suite.
Workload = Callable[[Console, Callable[[], None]], dict]


@dataclass
class UpOptions:
    build_dir: Path
    board: str = "qemu-virt"
    #: None: the spec's (its devices' transport), else vhost-user (msg for a service VM).
    transport: str | None = None
    #: None: the spec's ``backend``, else host.
    backend: str | None = None
    spec: Path | None = None
    restrict: bool = True
    disk_size: int = 64 << 20
    boot_timeout: float = 120.0
    kernel_fragment: Path | None = None
    #: service-vm only: "late-service", "backend-crash" or "service-restart" (see
    #: edgevirt.servicevm.up).
    fault: str | None = None
    workload: Workload | None = None
    #: "qemu" (QEMU virt, back-end on the host or in a service VM) or "xen" (Xen 4.17
    #: dom0less on QEMU: edgevirt.platforms.xen_dom0less).
    platform: str = "qemu"
    #: xen only: "direct" (QEMU loads Xen, DTB, modules) or "uboot" (boot script over TFTP).
    boot: str = "direct"


@dataclass
class UpResult:
    board: str
    transport: str = "vhost-user"
    backend_in: str = "host"
    restrict: bool = True
    #: Front-end checks carry a "front-end: " prefix when a service VM runs, whose own
    #: checks start with "service VM: " (and "host: " for the host's).
    checks: list[Check] = field(default_factory=list)
    #: The back-end's statistics (read on the host, or inside the service VM).
    backend: dict = field(default_factory=dict)
    carveout: tuple[int, int] = (0, 0)
    error: str | None = None
    #: What failed: "host" (building the images, before any VM ran), or with a service VM
    #: "service" or "front-end"; None when everything passed.
    failed_vm: str | None = None
    fault: str | None = None
    hypervisor: dict = field(default_factory=dict)
    #: The service VM's rootfs manifest (service-vm only).
    image: dict = field(default_factory=dict)
    #: The front-end's image: manifest and modules.
    frontend: dict = field(default_factory=dict)
    #: Rows of the front-end's memory map: {"what", "base" (None: not RAM), "size"}.
    memory: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    workload: dict = field(default_factory=dict)
    #: The front-end's virtio-msg kernel lines, where a fault scenario read them.
    kernel_log: list[str] = field(default_factory=list)
    artefacts: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.checks) and all(c.ok for c in self.checks)

    def check(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)

    def to_json(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        d["carveout"] = {"base": hex(self.carveout[0]), "size": self.carveout[1]}
        return d


# -- back-end placement -----------------------------------------------------------------------


class Placement:
    """Where the back-end runs; the hooks the core calls around the front-end's life."""

    name = "?"
    #: Prefix of the front-end's check names.
    prefix = ""

    def frontend_dir(self, build: Path) -> Path:
        return build

    def deploy_options(self) -> dict[str, Any]:
        """Extra :class:`DeployOptions` for the front-end (an external bus)."""
        return {}

    def frontend(self, machine: QemuMachine) -> None:
        """The front-end's QEMU machine, before :meth:`prepare`: its devices (in bus order)
        and their smoke checks, whose far side a placement may have to serve."""

    def prepare(self, reporter: Reporter, result: UpResult) -> None:
        """Images of the back-end side (before the front-end's)."""

    def start(self, reporter: Reporter, result: UpResult) -> None:
        """Bring the back-end side up (before the front-end boots)."""

    def watchers(self) -> list[Callable[[], None]]:
        """Raise while the front-end runs if the back-end side has died."""
        return []

    def under_frontend(
        self, reporter: Reporter, result: UpResult, console: Console, abort: Callable[[], None]
    ) -> None:
        """A fault of the back-end side played under the running front-end, after a passing
        suite; its checks go to ``result``."""

    def after_suite(self, reporter: Reporter, result: UpResult, frontend_ok: bool) -> None:
        """Checks of the back-end side while everything still runs."""

    def power_off(self, reporter: Reporter) -> None:
        """Shut the back-end side down cleanly (after the front-end)."""

    def host_checks(
        self, machine: QemuMachine, result: UpResult, disk_output: str | None, frontend_ok: bool
    ) -> list[Check]:
        return []

    def close(self, result: UpResult) -> None:
        """Stop whatever is left (always called)."""

    def blame(self, result: UpResult) -> str | None:
        return None


class HostBackend(Placement):
    """The back-end is a process on the host, started and stopped by the QEMU machine."""

    name = "host"

    def host_checks(
        self, machine: QemuMachine, result: UpResult, disk_output: str | None, frontend_ok: bool
    ) -> list[Check]:
        assert machine.backend is not None
        result.backend = machine.backend.stats()
        checks = [disk_check(machine.disk, disk_output)] if disk_output is not None else []
        return checks + backend_checks(result.backend, result.carveout[1])


def _placement(backend: str, board: Board, build: Path, opts: UpOptions) -> Placement:
    if backend == "host":
        if opts.fault is not None:
            raise ConfigError(f"fault {opts.fault!r} applies to --backend service-vm only")
        return HostBackend()
    from edgevirt.servicevm.up import ServiceVmBackend

    return ServiceVmBackend(board, build, opts)


# -- choosing ---------------------------------------------------------------------------------


def resolve(opts: UpOptions, board: Board) -> tuple[str, str, SystemSpec | None]:
    """Transport, back-end placement and spec from the options and the spec file."""
    spec = load_spec(opts.spec) if opts.spec is not None else None
    spec_transport = None
    if spec is not None:
        kinds = spec.transports
        if len(kinds) != 1:
            raise ConfigError(
                f"{spec.where('[[device]]')}: transports {', '.join(kinds) or 'none'}; "
                "`up` runs one transport (all devices mmio, or all msg)"
            )
        spec_transport = "msg" if kinds[0] == "msg" else "vhost-user"
        types = [d.type for d in spec.devices]
        base = sorted(t for t in types if t in DEVICES)
        extra = [t for t in types if t not in DEVICES]
        unknown = [t for t in extra if t not in devsmoke.SMOKES]
        if base != sorted(DEVICES) or unknown:
            raise ConfigError(
                f"{spec.where('[[device]]')}: devices {', '.join(types)}; `up` serves and "
                f"checks {' + '.join(DEVICES)}, optionally with one each of "
                f"{', '.join(devsmoke.SMOKES)}"
            )
        dup = sorted({t for t in extra if types.count(t) > 1})
        if dup:
            raise ConfigError(f"{spec.where('[[device]]')}: `up` checks one {dup[0]} device")
    for what, given, from_spec in (
        ("transport", opts.transport, spec_transport),
        ("backend", opts.backend, spec.backend if spec else None),
    ):
        if given is not None and from_spec is not None and given != from_spec:
            raise ConfigError(f"--{what} {given} contradicts the spec's {what} {from_spec}")
    backend = opts.backend or (spec.backend if spec else None) or "host"
    transport = opts.transport or spec_transport or ("msg" if backend == "service-vm" else None)
    transport = transport or "vhost-user"
    if transport not in TRANSPORTS:
        raise ConfigError(f"transport {transport!r}: expected one of {', '.join(TRANSPORTS)}")
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "service-vm" and transport != "msg":
        raise ConfigError(
            "the back-end in a service VM is reached by messages only: use --transport msg"
        )
    if not opts.restrict and (transport == "msg" or spec is not None):
        raise ConfigError("--no-restrict applies to the vhost-user transport without --spec")
    if spec is None and transport == "msg":
        spec = default_spec(board, transport, list(DEVICES), service_vm=backend == "service-vm")
    return transport, backend, spec


def memory_rows(board: Board, result: UpResult) -> list[dict[str, Any]]:
    q = board.qemu
    base, size = result.carveout
    pool = "restricted-dma-pool" if result.restrict else "no restricted pool"
    rows: list[dict[str, Any]] = [
        {"what": "private RAM (NUMA node 0)", "base": q.ram_base, "size": base - q.ram_base},
        {"what": f"carve-out: shared file (NUMA node 1), {pool}", "base": base, "size": size},
    ]
    if result.transport == "msg":
        rows.append(
            {"what": "message memory: ivshmem-doorbell BAR2 (PCI, not RAM)", "base": None,
             "size": 64 << 10}
        )  # fmt: skip
    return rows


# -- the whole path ---------------------------------------------------------------------------


def up(opts: UpOptions, reporter: Reporter | None = None) -> UpResult:
    """Bring the system up on ``opts.platform`` (see :mod:`edgevirt.platforms`)."""
    from edgevirt.platforms import runner

    return runner(opts.platform)(opts, reporter or Reporter())
