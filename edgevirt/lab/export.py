"""What a lab host needs to share a board: the labgrid exporter YAML and the place commands.

:func:`exporter_config` describes one board wired to a lab host: its UART (a
``RawSerialPort`` the exporter serves through ser2net/RFC2217 at the board's baud rate)
and a ``NetworkPowerPort`` for any power model labgrid knows (``simplerest``, ``rest``,
``netio``, ``gude``, …). :func:`place_commands` are the ``labgrid-client`` lines that
create the place and tag it with the board profile edgevirt reads.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any

import yaml

from edgevirt.board import Board
from edgevirt.errors import ConfigError

NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class PowerSpec:
    model: str
    host: str
    index: int = 0


def parse_power(text: str) -> PowerSpec:
    """``MODEL,HOST[,INDEX]``: ``simplerest,http://pdu:9999/relay/{index}/{value},2``."""
    parts = text.split(",")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise ConfigError(f"--power {text!r}: expected MODEL,HOST[,INDEX]")
    if len(parts) == 3 and not parts[2].isdigit():
        raise ConfigError(f"--power {text!r}: INDEX {parts[2]!r} is not a number")
    return PowerSpec(parts[0], parts[1], int(parts[2]) if len(parts) == 3 else 0)


def check_power_model(model: str) -> None:
    """A model labgrid's NetworkPowerDriver has a backend for (when labgrid is installed)."""
    try:
        import labgrid.driver.power as backends
    except ImportError:
        return  # writing the file does not need labgrid; the exporter host checks
    try:
        importlib.import_module(f"{backends.__name__}.{model}")
    except ImportError:
        from pathlib import Path

        known = sorted(
            p.stem
            for p in Path(backends.__file__).parent.glob("*.py")
            if not p.stem.startswith("_")
        )
        raise ConfigError(
            f"--power model {model!r}: labgrid has no such power backend "
            f"(known: {', '.join(known)})"
        ) from None


def exporter_config(
    board: Board, serial: str, power: PowerSpec | None, group: str | None = None
) -> dict[str, Any]:
    if not serial.startswith("/dev/"):
        raise ConfigError(
            f"--serial {serial!r}: labgrid's exporter serves only device paths under /dev/ "
            "(prefer a stable /dev/serial/by-id/… link)"
        )
    group = group or board.name
    if not NAME.match(group):
        raise ConfigError(f"--group {group!r}: use letters, digits, '_', '.', '-'")
    baud = board.console.baudrate if board.console else 115200
    cfg: dict[str, Any] = {"RawSerialPort": {"port": serial, "speed": baud}}
    if power is not None:
        check_power_model(power.model)
        if "{value}" not in power.host and power.model == "simplerest":
            raise ConfigError(
                f"--power host {power.host!r}: simplerest URLs contain {{value}} "
                "(and usually {index})"
            )
        cfg["NetworkPowerPort"] = {
            "model": power.model,
            "host": power.host,
            "index": power.index,
        }
    return {group: cfg}


def exporter_yaml(board: Board, cfg: dict[str, Any], command: str) -> str:
    # labgrid reads exporter configs as Jinja2 templates whose line statements start
    # with '#': a comment must start with '##'.
    return (
        f"## labgrid exporter config for board {board.name} ({board.description})\n"
        f"## written by: {command}\n" + yaml.safe_dump(cfg, sort_keys=False)
    )


def place_commands(
    coordinator: str, exporter: str, group: str, place: str, board: Board, config_file: str
) -> list[str]:
    lc = f"labgrid-client -x {coordinator} -p {place}"
    return [
        f"labgrid-exporter -c {coordinator} --name {exporter} {config_file}   # on the lab host",
        f"{lc} create",
        f"{lc} add-match '{exporter}/{group}/*'",
        f"{lc} set-tags board={board.name}",
    ]


def hints(board: Board, cfg: dict[str, Any]) -> list[str]:
    """What else the lab host and the board profile need."""
    group = next(iter(cfg))
    out = [
        "the exporter runs ser2net itself (Debian: apt-get install ser2net; it serves the "
        f"UART as RFC2217 at {cfg[group]['RawSerialPort']['speed']} baud while the place is "
        "acquired)",
    ]
    if "NetworkPowerPort" not in cfg[group]:
        out.append(
            "no --power: add a power resource labgrid can switch (NetworkPowerPort, "
            "PDUDaemonPort, USBPowerPort…) or edgevirt cannot boot the board"
        )
    if "bootloader" in board.raw and "tftp" not in board.raw:
        out.append(
            f"{board.path}: no [tftp] section: images go over the console with ymodem "
            "(slow); give the board a TFTP server"
        )
    return out
