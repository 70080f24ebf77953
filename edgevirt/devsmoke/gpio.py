"""virtio-gpio on the back-end's simulated bank, driven through its control socket.

The guest's ``ev-gpio`` tool (initramfs) lists the line names, drives an output the
back-end side reads while the guest holds it, and reads an input the back-end side sets.
Edges: QEMU 7.2's ``vhost-user-gpio-device`` never offers ``VIRTIO_GPIO_F_IRQ``, so over
vhost-user the guest has no interrupts; the edge check runs only when the feature is there.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

from edgevirt.backend.devices.gpiosim import control
from edgevirt.console.expect import Console
from edgevirt.devsmoke import DeviceSmoke
from edgevirt.smoke import Check

LINES = ("led", "button")
VIRTIO_ID = 41


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

    def backend_arg(self) -> str:
        return f"gpio:lines={'+'.join(LINES)},ctl={self.ctl}"

    def run(self, console: Console, prefix: str = "") -> list[Check]:
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
                f"{chip}: {', '.join(LINES)}" if ok else r.output.strip()[-160:],
            )
        ]
        seen: list[int] = []

        def watch() -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and 1 not in seen:
                seen.append(int(control(self.ctl, {"op": "get", "line": LINES[0]})["value"]))
                time.sleep(0.05)

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        r = console.run(f"ev-gpio drive {chip} 0 1 3000", 30)
        t.join(30)
        ok = r.status == 0 and 1 in seen
        checks.append(
            Check(
                f"{prefix}gpio output to back-end",
                ok,
                f"guest drives {LINES[0]}=1, back-end reads 1"
                if ok
                else f"{r.output.strip()[-120:]}; back-end saw {seen[-5:]}",
            )
        )
        values = []
        for v in (1, 0):
            control(self.ctl, {"op": "set", "line": LINES[1], "value": v})
            r = console.run(f"ev-gpio get {chip} 1", 10)
            values.append(r.output.split()[-1] if r.status == 0 and r.output.split() else "?")
        ok = values == ["1", "0"]
        checks.append(
            Check(
                f"{prefix}gpio input from back-end",
                ok,
                f"back-end sets {LINES[1]} 1 then 0, guest reads {' then '.join(values)}",
            )
        )
        if device_features(console, VIRTIO_ID)[:1] == "1":
            control(self.ctl, {"op": "set", "line": LINES[1], "value": 0})
            console.sendline(f"ev-gpio wait {chip} 1 rising 10000; echo rc=$?")
            console.expect(rb"waiting\r?\n", 20)
            t0 = time.monotonic()
            control(self.ctl, {"op": "set", "line": LINES[1], "value": 1})
            console.expect(rb"event rising\r?\n", 10)
            took = time.monotonic() - t0
            console.expect(rb"rc=0\r?\n", 10)
            # The console round trip dominates: 1 s bounds it (the back-end's own figure is in
            # its stats, irq_latency_us).
            checks.append(
                Check(
                    f"{prefix}gpio edge to guest",
                    took < 1.0,
                    f"rising edge on {LINES[1]} seen by the guest in {took * 1000:.0f} ms",
                )
            )
        return checks
