"""Boot strategies: the states a target passes through and how to get from one to the next.

``off → bootloader → kernel → shell``. A strategy lists the states it has (a direct kernel
boot has no bootloader state); asking for a state it lacks is a :class:`StrategyError`
naming the states it does have. Going back to an earlier state goes through ``off``
(a power cycle), the only way back a real board offers too.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from enum import IntEnum

from edgevirt.console.expect import Console
from edgevirt.deploy.power import Power
from edgevirt.deploy.uboot import AutobootMissed, UBoot, UBootSettings
from edgevirt.errors import ConsoleError, DeployError

log = logging.getLogger(__name__)

#: The guest agent's line (images/initramfs/edgevirt-agent): the shell is ready.
SHELL_READY = rb"EDGEVIRT-AGENT-READY[^\n]*\n"


class State(IntEnum):
    OFF = 0
    BOOTLOADER = 1
    KERNEL = 2
    SHELL = 3

    def __str__(self) -> str:
        return self.name.lower()


class StrategyError(DeployError):
    """A transition the strategy cannot make (e.g. to a bootloader it does not have)."""


class BootStrategy:
    """Direct kernel boot: powering on starts the kernel (QEMU ``-kernel``)."""

    name = "direct"
    states: tuple[State, ...] = (State.OFF, State.KERNEL, State.SHELL)

    def __init__(
        self,
        power: Power,
        connect: Callable[[], Console],
        *,
        boot_timeout: float = 120.0,
        shell_ready: bytes = SHELL_READY,
    ) -> None:
        self.power = power
        self.connect = connect
        self.boot_timeout = boot_timeout
        self.shell_ready = re.compile(shell_ready)
        self.state = State.OFF
        self.console: Console | None = None
        #: Extra checks while waiting (e.g. the back-end's health); raise to abort.
        self.watchers: list[Callable[[], None]] = []

    def abort(self) -> None:
        self.power.check()
        for w in self.watchers:
            w()

    def transition(self, to: State | str) -> Console | None:
        """Bring the target to ``to``; return the console (None when off)."""
        if isinstance(to, str):
            try:
                to = State[to.upper()]
            except KeyError:
                raise StrategyError(
                    f"unknown state {to!r}; states are {', '.join(map(str, State))}"
                ) from None
        if to not in self.states:
            raise StrategyError(
                f"the {self.name} boot strategy cannot reach state '{to}' "
                f"(from '{self.state}'); its states are " + " → ".join(map(str, self.states))
            )
        if to < self.state or (to == self.state == State.OFF):
            self.power_off()
        for st in self.states:
            if self.state < st <= to:
                log.info("%s: %s → %s", self.name, self.state, st)
                getattr(self, f"_enter_{st.name.lower()}")()
                self.state = st
        return self.console

    def power_off(self) -> None:
        self._close_console()
        self.power.off()
        self.state = State.OFF

    def _close_console(self) -> None:
        if self.console is not None:
            self.console.close()
            self.console = None

    def _power_on(self) -> Console:
        self._close_console()
        if self.power.console_first:
            self.console = self.connect()
            self.power.on()
        else:
            self.power.on()
            self.console = self.connect()
        return self.console

    def _enter_kernel(self) -> None:
        self._power_on()

    def _enter_shell(self) -> None:
        assert self.console is not None
        self.console.expect(self.shell_ready, self.boot_timeout, self.abort)


class UBootStrategy(BootStrategy):
    """Firmware first: stop U-Boot's autoboot, load the images, boot them."""

    name = "u-boot"
    states = (State.OFF, State.BOOTLOADER, State.KERNEL, State.SHELL)

    def __init__(
        self,
        power: Power,
        connect: Callable[[], Console],
        load_and_boot: Callable[[UBoot, Callable[[], None]], None],
        settings: UBootSettings | None = None,
        **kw: float | bytes,
    ) -> None:
        super().__init__(power, connect, **kw)  # type: ignore[arg-type]
        self.settings = settings or UBootSettings()
        self.load_and_boot = load_and_boot
        self.uboot: UBoot | None = None
        #: Attempts the last bootloader entry needed (1 = first try).
        self.attempts = 0

    def _enter_bootloader(self) -> None:
        misses: list[str] = []
        for attempt in range(1, self.settings.retries + 2):
            self.attempts = attempt
            console = self._power_on()
            self.uboot = UBoot(console, self.settings)
            try:
                self.uboot.interrupt(self.abort)
                return
            except AutobootMissed as e:
                log.warning("autoboot missed (attempt %d): power cycling", attempt)
                misses.append(str(e).splitlines()[0])
                console.log.note(f"autoboot missed on attempt {attempt}; power cycling")
                self._close_console()
                self.power.off()
        raise ConsoleError(
            f"U-Boot autoboot could not be interrupted in {len(misses)} attempts "
            f"(pattern {self.settings.autoboot!r}, key {self.settings.interrupt!r}): "
            + "; ".join(misses),
            hint="check [bootloader] autoboot/interrupt and that bootdelay > 0",
        )

    def _enter_kernel(self) -> None:
        assert self.uboot is not None
        self.load_and_boot(self.uboot, self.abort)
