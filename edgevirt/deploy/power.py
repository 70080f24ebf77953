"""Power control of a target: the QEMU process, shell commands, or a person.

A power driver turns the target on and off and tells, while we wait on the console,
whether the target is still there (:meth:`Power.check`). The QEMU driver lives with the
QEMU machine (:mod:`edgevirt.deploy.machine`); the drivers here serve real boards:
``[power] kind = "command"`` runs configured commands (a relay, a PDU, ``uhubctl``),
``kind = "manual"`` asks the operator through a callback the CLI provides.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from edgevirt.board import Board, get_key
from edgevirt.errors import ConfigError, DeployError

log = logging.getLogger(__name__)


class Power(ABC):
    #: The console exists while the target is off (a UART adapter in a lab): connect to
    #: it before powering on, so no early boot output is lost.
    console_first: bool = False

    @abstractmethod
    def on(self) -> None: ...

    @abstractmethod
    def off(self) -> None: ...

    def reset(self) -> None:
        self.off()
        self.on()

    def check(self) -> None:
        """Raise if the target has gone away (called while waiting on its console)."""
        return None

    @property
    def console_url(self) -> str | None:
        """A URL that is only known once powered (QEMU's socket); None: the board's own."""
        return None

    def close(self) -> None:
        """Release everything this driver started (idempotent)."""
        self.off()


class CommandPower(Power):
    def __init__(self, on: str, off: str, reset: str | None = None, timeout: float = 30.0):
        self.commands = {"on": on, "off": off, "reset": reset}
        self.timeout = timeout
        self.is_on = False

    def _run(self, what: str) -> None:
        cmd = self.commands[what]
        assert cmd is not None
        log.info("power %s: %s", what, cmd)
        try:
            r = subprocess.run(
                shlex.split(cmd), capture_output=True, text=True, timeout=self.timeout
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DeployError(f"power {what} command {cmd!r} failed: {e}") from e
        if r.returncode:
            raise DeployError(
                f"power {what} command {cmd!r} exited {r.returncode}: {r.stderr.strip()[-300:]}"
            )

    def on(self) -> None:
        self._run("on")
        self.is_on = True

    def off(self) -> None:
        self._run("off")
        self.is_on = False

    def reset(self) -> None:
        if self.commands["reset"]:
            self._run("reset")
        else:
            super().reset()

    def close(self) -> None:
        if self.is_on:
            self.off()


class ManualPower(Power):
    """The operator switches the board; ``ask`` shows the request and waits for them."""

    def __init__(self, ask: Callable[[str], None]) -> None:
        self.ask = ask

    def on(self) -> None:
        self.ask("switch the board ON (or press its reset button), then continue")

    def off(self) -> None:
        self.ask("switch the board OFF, then continue")

    def close(self) -> None:
        pass  # never ask a person to do anything on the way out


def no_operator(text: str) -> None:
    raise DeployError(f"manual power: {text} — but nobody is there to do it (not interactive)")


def board_power(board: Board, ask: Callable[[str], None] | None = None) -> Power:
    """The ``[power]`` driver for a real board (QEMU boards use the QEMU machine)."""
    where = board.where("power")
    p: dict[str, Any] = board.raw.get("power", {"kind": "manual"})
    kind = get_key(p, "kind", str, where, "manual")
    if kind == "command":
        return CommandPower(
            get_key(p, "on", str, where),
            get_key(p, "off", str, where),
            get_key(p, "reset", str, where, None),
            float(get_key(p, "timeout", (int, float), where, 30)),
        )
    if kind == "manual":
        return ManualPower(ask or no_operator)
    raise ConfigError(
        f"{where}.kind: expected 'command' or 'manual' for a real board, got {kind!r}"
    )
