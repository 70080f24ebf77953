"""Boot strategy state machine and power drivers, with a real shell as the target."""

import pytest

from edgevirt.console.expect import Console
from edgevirt.console.fake import PtyShellPort
from edgevirt.deploy.power import CommandPower, ManualPower, Power
from edgevirt.deploy.strategy import BootStrategy, State, StrategyError
from edgevirt.errors import DeployError

AGENT = ["/bin/sh", "-c", "echo EDGEVIRT-AGENT-READY release=fake; exec /bin/sh -i"]


class RecordingPower(Power):
    def __init__(self):
        self.events = []

    def on(self):
        self.events.append("on")

    def off(self):
        self.events.append("off")


@pytest.fixture
def direct(tmp_path):
    power = RecordingPower()
    s = BootStrategy(
        power,
        lambda: Console(PtyShellPort(AGENT), log_path=tmp_path / "c.log"),
        boot_timeout=5,
    )
    yield s, power
    s.power_off()


def test_direct_boot_reaches_the_shell(direct):
    s, power = direct
    console = s.transition("shell")
    assert s.state is State.SHELL and power.events == ["on"]
    assert console is not None and console.run("echo hi").output == "hi"


def test_impossible_transition_names_the_states(direct):
    s, _ = direct
    with pytest.raises(StrategyError) as ei:
        s.transition(State.BOOTLOADER)
    assert "direct boot strategy cannot reach state 'bootloader'" in str(ei.value)
    assert "off → kernel → shell" in str(ei.value)
    with pytest.raises(StrategyError, match="unknown state 'firmware'"):
        s.transition("firmware")


def test_going_back_power_cycles(direct):
    s, power = direct
    s.transition(State.SHELL)
    s.transition(State.KERNEL)
    assert power.events == ["on", "off", "on"] and s.state is State.KERNEL
    s.transition(State.OFF)
    assert power.events[-1] == "off" and s.console is None


def test_watcher_aborts_the_boot_wait(tmp_path):
    def dead():
        raise DeployError("QEMU exited with status 1: boom")

    s = BootStrategy(
        RecordingPower(),
        lambda: Console(PtyShellPort(["/bin/sh", "-c", "sleep 5"])),
        boot_timeout=30,
    )
    s.watchers.append(dead)
    with pytest.raises(DeployError, match="boom"):
        s.transition(State.SHELL)
    s.power_off()


def test_command_power_runs_the_configured_commands(tmp_path):
    flag = tmp_path / "on"
    p = CommandPower(f"touch {flag}", f"rm -f {flag}")
    p.on()
    assert flag.exists()
    p.reset()  # no reset command: off then on
    assert flag.exists()
    p.close()
    assert not flag.exists()


def test_command_power_failure_quotes_stderr(tmp_path):
    p = CommandPower("sh -c 'echo relay stuck >&2; exit 3'", "true")
    with pytest.raises(DeployError, match="exited 3: relay stuck"):
        p.on()


def test_manual_power_asks_the_operator():
    asked = []
    p = ManualPower(asked.append)
    p.on()
    p.off()
    p.close()  # never asks on the way out
    assert len(asked) == 2 and "ON" in asked[0] and "OFF" in asked[1]
