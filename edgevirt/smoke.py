"""The smoke suite `edgevirt up` runs over the serial console.

The guest-side checks are data: ``edgevirt/suites/smoke.yaml``, the same file
``edgevirt test smoke --board B`` runs. The host-side checks (disk image contents,
back-end counters) need the host and stay in :mod:`edgevirt.up`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edgevirt.console.expect import CommandResult
from edgevirt.suite.model import Step, Suite, load_suite
from edgevirt.suite.runner import judge

DISK_TEST_BYTES = 8 << 20
#: The step whose output carries the guest's sha256 of the data it wrote to /dev/vda.
DISK_STEP = "blk write/read-back"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def smoke_suite() -> Suite:
    return load_suite("smoke")


@dataclass
class GuestCheck:
    """One guest command and its judgement (the form :mod:`edgevirt.msgup` composes)."""

    name: str
    command: str
    judge: Callable[[CommandResult], tuple[bool, str]]
    timeout: float = 60.0


def smoke_vars(carveout_base: int, carveout_size: int, nodes: list[str]) -> dict[str, str]:
    return {
        "carveout_base": f"{carveout_base:x}",
        "carveout_size": str(carveout_size),
        "carveout_mib": str(carveout_size >> 20),
        "virtio_nodes": " ".join(sorted(n.rsplit("@", 1)[-1] for n in nodes)),
    }


def guest_checks(carveout_base: int, carveout_size: int, nodes: list[str]) -> list[GuestCheck]:
    """The smoke suite's run steps as :class:`GuestCheck` objects, judged as the suite is."""
    suite = smoke_suite()
    values = smoke_vars(carveout_base, carveout_size, nodes)

    def expand(text: str) -> str:
        return suite.expand(text, values)

    def judge_for(step: Step) -> Callable[[CommandResult], tuple[bool, str]]:
        return lambda res: judge(step, res.status, res.output, expand)

    return [
        GuestCheck(s.name, expand(s.text), judge_for(s), s.timeout)
        for s in suite.steps
        if s.kind == "run"
    ]
