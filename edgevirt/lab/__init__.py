"""Board farms: labgrid places as edgevirt targets (the optional ``edgevirt[labgrid]`` extra).

A labgrid coordinator knows the places; its exporters publish each board's serial port
(ser2net, RFC2217) and power. This layer reserves and acquires a place, turns its
resources into the console URL and power driver of an ordinary
:class:`~edgevirt.deploy.target.Target`, and always releases it. Nothing outside this
package imports labgrid, and this package imports it only when a command needs it.
"""

from __future__ import annotations

import os
from types import ModuleType

from edgevirt.errors import ConfigError, DeployError, SetupError

#: labgrid's own default coordinator port (``labgrid-client -x HOST`` adds it too).
DEFAULT_PORT = 20408
ENV_COORDINATOR = "LG_COORDINATOR"


class LabError(DeployError):
    """The coordinator, a place or one of its resources failed us; names which."""


class PlaceBusy(LabError):
    """The place is acquired (or reserved) by someone else."""


class PlaceNotFound(ConfigError):
    """No place of that name, or no place matches the tags asked for."""


def require_labgrid() -> ModuleType:
    """Import labgrid's client, or say how to install it."""
    # grpc's fork handlers deadlock with the subprocesses edgevirt starts (QEMU, ser2net,
    # labgrid-client): labgrid's own tests turn them off the same way.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    try:
        import labgrid.remote.client as client
    except ImportError as e:
        raise SetupError(
            f"labgrid is not installed ({e})", hint="pip install 'edgevirt[labgrid]'"
        ) from e
    return client


def coordinator_address(address: str | None) -> str:
    """``--coordinator`` or ``$LG_COORDINATOR`` as ``host:port`` (labgrid's default port)."""
    addr = address or os.environ.get(ENV_COORDINATOR)
    if not addr:
        raise ConfigError(
            "no labgrid coordinator: pass --coordinator HOST:PORT or set LG_COORDINATOR"
        )
    if addr.startswith("ws://") or addr.startswith("http"):
        raise ConfigError(f"coordinator {addr!r}: labgrid ≥ 25 speaks gRPC at HOST:PORT, not a URL")
    host, sep, port = addr.rpartition(":")
    if not sep or not host:
        return f"{addr}:{DEFAULT_PORT}"
    if not port.isdigit():
        raise ConfigError(f"coordinator {addr!r}: port {port!r} is not a number")
    return addr
