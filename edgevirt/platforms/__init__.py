"""The platforms ``edgevirt up`` brings a system up on, as peers.

Each is a module with one function ``(UpOptions, Reporter | None) -> UpResult`` (the options
and the report are :mod:`edgevirt.up`'s), imported only when chosen: a new platform is a
module and one line here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from edgevirt.errors import ConfigError

if TYPE_CHECKING:
    from edgevirt.report import Reporter
    from edgevirt.up import UpOptions, UpResult

#: name -> "module:function"
PLATFORMS = {
    "qemu": "edgevirt.platforms.qemu_virt:up_qemu",  # QEMU virt is the hypervisor
    "xen": "edgevirt.platforms.xen_dom0less:up_xen",  # Xen 4.17 dom0less on QEMU
}


def runner(name: str) -> Callable[[UpOptions, Reporter | None], UpResult]:
    """The function that runs platform ``name``; ConfigError for one that does not exist."""
    if name not in PLATFORMS:
        raise ConfigError(f"platform {name!r}: expected one of {', '.join(PLATFORMS)}")
    module, function = PLATFORMS[name].split(":")
    run: Callable[[UpOptions, Reporter | None], UpResult] = getattr(
        importlib.import_module(module), function
    )
    return run
