"""Where edgevirt keeps things: the input cache (keyed by inputs) and the project's files."""

from __future__ import annotations

import os
from pathlib import Path

#: The repository (or installed source tree) root: boards/, images/, devicetree/ live here.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """``$EDGEVIRT_CACHE`` or ``~/.cache/edgevirt``: survives ``git clean`` and new clones."""
    env = os.environ.get("EDGEVIRT_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    path = base if env else base / "edgevirt"
    path.mkdir(parents=True, exist_ok=True)
    return path


def images_dir() -> Path:
    return PROJECT_ROOT / "images"


def boards_dir() -> Path:
    return PROJECT_ROOT / "boards"


def specs_dir() -> Path:
    """Example system specs; ``<board>.toml`` there is that board's default spec."""
    return PROJECT_ROOT / "devicetree" / "specs"


def board_example_spec(board_name: str) -> Path | None:
    path = specs_dir() / f"{board_name}.toml"
    return path if path.is_file() else None
