"""Kernel-emulated peripherals the service VM lends in tests and demos.

A board's service VM owns real GPIO banks and I2C buses; on QEMU ``virt`` the service VM
makes real *kernel* peripherals instead, so the back-end goes through the same character
devices it would use on a board, and something else in the service VM (its console, a
test) can drive and observe the far side:

- **gpio-sim** (``CONFIG_GPIO_SIM``, configured through configfs): a gpiochip whose lines
  have names; ``/sys/devices/platform/<dev>/<chip>/sim_gpioN/pull`` drives an input
  (``pull-up``/``pull-down``), ``…/value`` shows what the line's user drives.
- **i2c-stub** (built as a module from the kernel tree, ``images/servicevm/modules``): an
  SMBus adapter that answers at ``chip_addr`` with a 256-register map each.

The peer's configuration carries them as ``"peripherals": {"gpio_sim": {"label": "ev-gpio",
"lines": ["led", "button"]}, "i2c_stub": {"addresses": [80, 72]}}``; :func:`setup` makes
them before the devices open (``chip=ev-gpio`` and ``bus=i2c-stub`` then find them).
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from edgevirt.errors import ConfigError

log = logging.getLogger(__name__)

CONFIGFS = Path("/sys/kernel/config")
MODULES = Path("/usr/lib/modules")
I2C_STUB_NAME = "SMBus stub driver"


def check(data: object, src: str) -> dict:
    """Validate the ``peripherals`` object of a peer configuration."""
    if data is None:
        return {}
    if not isinstance(data, dict) or set(data) - {"gpio_sim", "i2c_stub"}:
        raise ConfigError(f"{src}: field peripherals: expected an object with gpio_sim, i2c_stub")
    gs = data.get("gpio_sim")
    if gs is not None:
        ok = isinstance(gs, dict) and isinstance(gs.get("label"), str)
        lines = gs.get("lines") if isinstance(gs, dict) else None
        if not ok or not isinstance(lines, list) or not lines or \
                not all(isinstance(n, str) and n for n in lines):  # fmt: skip
            raise ConfigError(f"{src}: field peripherals.gpio_sim: expected "
                              '{"label": "…", "lines": ["name", …]}')  # fmt: skip
    st = data.get("i2c_stub")
    if st is not None:
        addrs = st.get("addresses") if isinstance(st, dict) else None
        if not isinstance(addrs, list) or not addrs or \
                not all(isinstance(a, int) and 0x03 <= a <= 0x77 for a in addrs):  # fmt: skip
            raise ConfigError(f"{src}: field peripherals.i2c_stub.addresses: expected 7-bit "
                              "addresses 0x03..0x77")  # fmt: skip
    return data


def setup(data: dict, configfs: Path = CONFIGFS, modules: Path = MODULES) -> dict:
    """Make the peripherals; returns what was made (chip, sysfs paths, adapter)."""
    made: dict = {}
    gs = data.get("gpio_sim")
    if gs is not None:
        made["gpio_sim"] = gpio_sim(gs["label"], gs["lines"], configfs)
    st = data.get("i2c_stub")
    if st is not None:
        made["i2c_stub"] = i2c_stub(st["addresses"], modules)
    return made


def gpio_sim(label: str, lines: list[str], configfs: Path = CONFIGFS) -> dict:
    root = configfs / "gpio-sim"
    if not root.is_dir():
        if not configfs.is_dir() or not any(configfs.iterdir()):
            subprocess.run(["mount", "-t", "configfs", "configfs", str(configfs)], check=False)
        if not root.is_dir():
            raise ConfigError(f"gpio-sim: {root} missing (kernel without CONFIG_GPIO_SIM or "
                              "CONFIG_CONFIGFS_FS)")  # fmt: skip
    dev = root / label
    dev.mkdir(exist_ok=True)
    bank = dev / "bank0"
    bank.mkdir(exist_ok=True)
    (bank / "label").write_text(label)
    (bank / "num_lines").write_text(str(len(lines)))
    for i, name in enumerate(lines):
        line = bank / f"line{i}"
        line.mkdir(exist_ok=True)
        (line / "name").write_text(name)
    (dev / "live").write_text("1")
    chip = (bank / "chip_name").read_text().strip()
    dev_name = (dev / "dev_name").read_text().strip()
    sysfs = f"/sys/devices/platform/{dev_name}/{chip}"
    log.info("gpio-sim %s: /dev/%s, lines %s, sysfs %s", label, chip, lines, sysfs)
    return {"chip": f"/dev/{chip}", "sysfs": sysfs}


def i2c_stub(addresses: list[int], modules: Path = MODULES) -> dict:
    ko = modules / "i2c-stub.ko"
    arg = "chip_addr=" + ",".join(hex(a) for a in addresses)
    r = subprocess.run(["insmod", str(ko), arg], capture_output=True, text=True)
    if r.returncode != 0:
        raise ConfigError(f"i2c-stub: insmod {ko} {arg}: {r.stderr.strip() or r.returncode}")
    log.info("i2c-stub at %s", ", ".join(hex(a) for a in addresses))
    return {"addresses": addresses}
