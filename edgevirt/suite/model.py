"""Test suites in YAML: what a suite file may say, validated with file and step in messages.

::

    name: smoke
    timeout: 60                 # default per-step timeout (seconds)
    vars: {greeting: hello}     # defaults; the target adds board values (carveout_base, …)
    steps:
      - name: kernel version
        run: uname -r           # marker-framed; exit status and output captured
        status: 0               # expected exit status (default 0; null: any)
        match: '^6\\.'          # regex(es) the output must match (re.M)
        no_match: 'WARNING'     # regex(es) it must not match
        detail: 'kernel {0}'    # shown on success; {0}/{name} are the first match's groups
        timeout: 10
      - {name: banner, expect: 'login:', timeout: 30}    # wait for console output
      - {name: poke, send: "\\n"}                         # write raw text
      - {name: power cycle, reboot: true}                 # back to the shell via power-off

``${name}`` in run/send/expect/match/detail is replaced by the suite's and the target's vars
when ``name`` is one of them; other ``$`` text is left for the target's shell.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from edgevirt.errors import ConfigError

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
KINDS = ("run", "expect", "send", "reboot")
_STEP_KEYS = {"name", "timeout", "status", "match", "no_match", "detail", *KINDS}


@dataclass
class Step:
    name: str
    kind: str  # one of KINDS
    text: str = ""  # the command, pattern or text to send
    timeout: float = 60.0
    status: int | None = 0
    match: list[str] = field(default_factory=list)
    no_match: list[str] = field(default_factory=list)
    detail: str | None = None


@dataclass
class Suite:
    name: str
    path: Path
    steps: list[Step]
    vars: dict[str, str] = field(default_factory=dict)
    description: str = ""

    def expand(self, text: str, extra: dict[str, str]) -> str:
        """Replace ``${name}`` of known vars; anything else (``$d``, ``${x:-y}``) is the
        shell's and stays as written."""
        values = {**self.vars, **extra}
        return _VAR.sub(lambda m: values.get(m.group(1), m.group(0)), text)


def _regexes(value: Any, where: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise ConfigError(f"{where}: expected a regex or a list of regexes, got {value!r}")
    for r in items:
        try:
            re.compile(_VAR.sub("x", r))
        except re.error as e:
            raise ConfigError(f"{where}: invalid regex {r!r}: {e}") from None
    return items


def _step(d: Any, i: int, default_timeout: float, where: str) -> Step:
    w = f"{where}: steps[{i}]"
    if not isinstance(d, dict):
        raise ConfigError(f"{w}: expected a mapping, got {d!r}")
    unknown = sorted(set(d) - _STEP_KEYS)
    if unknown:
        raise ConfigError(f"{w}: unknown key(s) {', '.join(unknown)}")
    kinds = [k for k in KINDS if k in d]
    if len(kinds) != 1:
        raise ConfigError(f"{w}: needs exactly one of {', '.join(KINDS)}, got {kinds or 'none'}")
    kind = kinds[0]
    name = d.get("name") or f"{kind} {i + 1}"
    w = f"{where}: step {name!r}"
    value = d[kind]
    if kind == "reboot":
        if value is not True:
            raise ConfigError(f"{w}: reboot: expected true")
        text = ""
    elif not isinstance(value, str) or not value:
        raise ConfigError(f"{w}: {kind}: expected a non-empty string")
    else:
        text = value
    timeout = d.get("timeout", default_timeout)
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
        raise ConfigError(f"{w}: timeout: expected seconds > 0, got {timeout!r}")
    status = d.get("status", 0)
    if status is not None and (not isinstance(status, int) or isinstance(status, bool)):
        raise ConfigError(f"{w}: status: expected an integer or null, got {status!r}")
    if kind != "run" and any(k in d for k in ("status", "match", "no_match")):
        raise ConfigError(f"{w}: status/match/no_match only apply to run steps")
    if kind == "expect":
        _regexes(text, f"{w}: expect")
    detail = d.get("detail")
    if detail is not None and not isinstance(detail, str):
        raise ConfigError(f"{w}: detail: expected a string")
    return Step(
        name=str(name),
        kind=kind,
        text=text,
        timeout=float(timeout),
        status=status,
        match=_regexes(d.get("match", []), f"{w}: match"),
        no_match=_regexes(d.get("no_match", []), f"{w}: no_match"),
        detail=detail,
    )


def parse_suite(text: str, path: Path) -> Suite:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to parse") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping with name and steps")
    unknown = sorted(set(doc) - {"name", "description", "timeout", "vars", "steps"})
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}")
    steps = doc.get("steps")
    if not isinstance(steps, list) or not steps:
        raise ConfigError(f"{path}: steps: expected a non-empty list")
    timeout = doc.get("timeout", 60)
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not 0 < timeout < 1e9:
        raise ConfigError(f"{path}: timeout: expected seconds > 0, got {timeout!r}")
    variables = doc.get("vars", {}) or {}
    if not isinstance(variables, dict):
        raise ConfigError(f"{path}: vars: expected a mapping")
    parsed = [_step(s, i, float(timeout), str(path)) for i, s in enumerate(steps)]
    names = [s.name for s in parsed]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{path}: duplicate step name(s) {', '.join(dupes)}")
    return Suite(
        name=str(doc.get("name") or path.stem),
        path=path,
        steps=parsed,
        vars={str(k): str(v) for k, v in variables.items()},
        description=str(doc.get("description", "")),
    )


def shipped_suites() -> list[str]:
    return sorted(
        p.name.removesuffix(".yaml")
        for p in resources.files("edgevirt.suites").iterdir()
        if p.name.endswith(".yaml")
    )


def load_suite(name_or_path: str | Path) -> Suite:
    """A suite file, or the name of one shipped with edgevirt (``smoke``)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"suite file {p} not found")
        return parse_suite(p.read_text(), p)
    res = resources.files("edgevirt.suites") / f"{name_or_path}.yaml"
    if not res.is_file():
        raise ConfigError(
            f"suite {str(name_or_path)!r} not found; shipped suites: {', '.join(shipped_suites())}"
        )
    return parse_suite(res.read_text(), Path(str(res)))
