"""virtio-gpio: two named lines, ``led`` (the guest drives it) and ``button`` (an input).

The bank behind them is the host back-end's simulated bank, driven through its control
socket, or, with the back-end in the service VM, a real kernel gpiochip there (gpio-sim,
made by the service VM's peripherals setup) driven through gpio-sim's sysfs on the service
VM's console. The guest's ``ev-gpio`` tool (initramfs) lists the line names, drives an
output the bank's side reads while the guest holds it, and reads an input the bank's side
sets. Edges: QEMU 7.2's ``vhost-user-gpio-device`` never offers ``VIRTIO_GPIO_F_IRQ``, so
over vhost-user the guest has no interrupts; the edge check runs only when the feature is
there (virtio-msg).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from edgevirt.backend.devices.gpiosim import control
from edgevirt.console.expect import Console
from edgevirt.devsmoke import DeviceSmoke
from edgevirt.errors import DeployError
from edgevirt.smoke import Check

LINES = ("led", "button")
VIRTIO_ID = 41
#: The gpio-sim chip's label in the service VM (the back-end finds it by this name).
SIM_LABEL = "ev-gpio"
SIM_CONFIG = f"/sys/kernel/config/gpio-sim/{SIM_LABEL}"


def device_features(console: Console, device_id: int) -> str:
    """The feature bits sysfs shows for virtio device id ``device_id`` (bit 0 first)."""
    r = console.run(
        "for d in /sys/bus/virtio/devices/*; do "
        f"[ $(cat $d/device) = {device_id:#06x} ] && cat $d/features; done; true", 10)  # fmt: skip
    return r.output.strip()


class GpioSmoke(DeviceSmoke):
    type = "gpio"
    qemu_kind = "vhost-user-gpio-device"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.ctl = self.dir / "gpio.sock"
        #: gpio-sim's sysfs directory of the chip in the service VM.
        self.sim = ""

    def backend_arg(self) -> str:
        return f"gpio:lines={'+'.join(LINES)},ctl={self.ctl}"

    def service_arg(self) -> str:
        return f"gpio:lines={'+'.join(LINES)},chip={SIM_LABEL}"

    def service_peripherals(self) -> dict:
        return {"gpio_sim": {"label": SIM_LABEL, "lines": list(LINES)}}

    def service_ready(self) -> None:
        assert self.service is not None
        r = self.service.run(f"cat {SIM_CONFIG}/dev_name {SIM_CONFIG}/bank0/chip_name", 20)
        words = r.output.split()
        if r.status != 0 or len(words) != 2:
            raise DeployError(f"service VM: no gpio-sim chip {SIM_LABEL}: {r.output[-200:]}")
        self.sim = f"/sys/devices/platform/{words[0]}/{words[1]}"

    # -- the bank's side: what the guest drives, what it reads ---------------------------

    def driven(self, line: int) -> int | None:
        """The value the guest drives on ``line``, read on the bank's side."""
        if self.service is None:
            return int(control(self.ctl, {"op": "get", "line": LINES[line]})["value"])
        r = self.service.run(f"cat {self.sim}/sim_gpio{line}/value", 10)
        return int(r.output.split()[-1]) if r.status == 0 and r.output.split() else None

    def pull(self, line: int, value: int) -> None:
        """Set input ``line`` to ``value`` from the bank's side."""
        if self.service is None:
            control(self.ctl, {"op": "set", "line": LINES[line], "value": value})
            return
        r = self.service.run(f"echo pull-{'up' if value else 'down'} > "
                             f"{self.sim}/sim_gpio{line}/pull", 10)  # fmt: skip
        if r.status != 0:
            raise DeployError(f"service VM: gpio-sim pull of line {line}: {r.output[-160:]}")

    def run(self, console: Console, prefix: str = "") -> list[Check]:
        bank = "gpio-sim chip in the service VM" if self.service else "simulated bank"
        r = console.run("ls /dev/gpiochip*", 10)
        chips = r.output.split()
        if r.status != 0 or len(chips) != 1:
            return [Check(f"{prefix}gpio line names", False, f"gpio chips: {r.output.strip()}")]
        chip = chips[0]
        r = console.run(f"ev-gpio info {chip}", 10)
        want = rf"lines={len(LINES)}\s+" + r"\s+".join(f"{i} {n}" for i, n in enumerate(LINES))
        ok = r.status == 0 and re.search(want, r.output) is not None
        checks = [
            Check(
                f"{prefix}gpio line names",
                ok,
                f"{chip}: {', '.join(LINES)} ({bank})" if ok else r.output.strip()[-160:],
            )
        ]
        # The guest holds the line while the bank's side reads it.
        console.sendline(f"ev-gpio drive {chip} 0 1 3000; echo rc=$?")
        console.expect(rb"driving\r?\n", 20)
        seen = self.driven(0)
        rc = console.expect(rb"rc=(\d+)\r?\n", 20).group(1).decode()
        checks.append(
            Check(
                f"{prefix}gpio output to back-end",
                seen == 1 and rc == "0",
                f"guest drives {LINES[0]}=1 (ev-gpio exit {rc}), the {bank} reads {seen}",
            )
        )
        values = []
        for v in (1, 0):
            self.pull(1, v)
            r = console.run(f"ev-gpio get {chip} 1", 10)
            values.append(r.output.split()[-1] if r.status == 0 and r.output.split() else "?")
        ok = values == ["1", "0"]
        checks.append(
            Check(
                f"{prefix}gpio input from back-end",
                ok,
                f"the {bank} sets {LINES[1]} 1 then 0, guest reads {' then '.join(values)}",
            )
        )
        if device_features(console, VIRTIO_ID)[:1] == "1":
            self.pull(1, 0)
            console.sendline(f"ev-gpio wait {chip} 1 rising 10000; echo rc=$?")
            console.expect(rb"waiting\r?\n", 20)
            t0 = time.monotonic()
            self.pull(1, 1)
            console.expect(rb"event rising\r?\n", 10)
            took = time.monotonic() - t0
            console.expect(rb"rc=0\r?\n", 10)
            # The console round trips dominate (two of them with a service VM): 1 s bounds
            # it (the back-end's own figure is in its stats, irq_latency_us).
            checks.append(
                Check(
                    f"{prefix}gpio edge to guest",
                    took < 1.0,
                    f"rising edge on {LINES[1]} seen by the guest in {took * 1000:.0f} ms",
                )
            )
        return checks
