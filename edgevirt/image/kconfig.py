"""Why did an option from a fragment not survive ``olddefconfig``? Ask the Kconfig files.

Kconfig silently drops a requested ``CONFIG_X=y`` whose dependencies are unmet, and its own
warnings only name the option (``merge_config.sh``: "Value requested for CONFIG_X not in
final .config"). This module reads the tree's Kconfig files just far enough to answer the
user's real question: *which* dependency blocked it.

It understands ``source``/``rsource``/``osource`` (with ``$(SRCARCH)``), ``if``/``endif``,
``menu``/``choice`` blocks with their ``depends on``, ``config``/``menuconfig`` entries with
``depends on`` and a prompt, and skips help text. Expressions are evaluated with Kconfig's
tristate logic (n=0, m=1, y=2; ``!`` is 2-x, ``&&`` min, ``||`` max) against the final
``.config``. It is an explainer, not a Kconfig implementation: ``conf`` decides; this says why.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

_TRI = {"n": 0, "m": 1, "y": 2}
_BLOCK_KEYWORDS = {
    "config", "menuconfig", "choice", "endchoice", "comment", "menu", "endmenu", "if",
    "endif", "source", "rsource", "osource", "orsource", "mainmenu",
}  # fmt: skip
_TOKEN = re.compile(r'\s*(\|\||&&|!=|<=|>=|[()!=<>]|"(?:[^"\\]|\\.)*"|[A-Za-z0-9_.$\-]+)')


@dataclass
class Definition:
    """One ``config SYM`` entry: where it is, what it depends on, whether a user can set it."""

    symbol: str
    file: Path
    line: int
    depends: list[str] = field(default_factory=list)  # own + enclosing if/menu, as text
    has_prompt: bool = False


@dataclass
class KconfigIndex:
    definitions: dict[str, list[Definition]]

    def get(self, symbol: str) -> list[Definition]:
        return self.definitions.get(symbol.removeprefix("CONFIG_"), [])


def load(tree: Path, arch: str = "arm64") -> KconfigIndex:
    """Index every ``config`` entry reachable from ``<tree>/Kconfig``."""
    defs: dict[str, list[Definition]] = {}
    _parse_file(tree, tree / "Kconfig", arch, [], defs, set())
    log.debug("kconfig: %d symbols indexed from %s", len(defs), tree)
    return KconfigIndex(defs)


def _logical_lines(path: Path) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    pending, start = "", 0
    for n, raw in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not pending:
            start = n
        if raw.endswith("\\"):
            pending += raw[:-1] + " "
            continue
        out.append((start, pending + raw))
        pending = ""
    return out


def _parse_file(
    tree: Path,
    path: Path,
    arch: str,
    outer: list[str],
    defs: dict[str, list[Definition]],
    seen: set[Path],
) -> None:
    if path in seen or not path.is_file():
        return
    seen.add(path)
    conds = list(outer)  # enclosing conditions (if / menu depends on), a stack
    marks: list[int] = []  # len(conds) at each block opening
    current: Definition | None = None
    block: str | None = None  # "config", "menu", "choice", "comment"
    help_indent: int | None = None
    in_help = False
    for n, line in _logical_lines(path):
        stripped = line.strip()
        indent = len(line.expandtabs()) - len(line.expandtabs().lstrip())
        if in_help:
            if not stripped:
                continue
            if help_indent is None:
                help_indent = indent
            if indent >= help_indent:
                continue
            in_help = False
        if not stripped or stripped.startswith("#"):
            continue
        word, _, rest = stripped.partition(" ")
        rest = rest.strip()
        if word in _BLOCK_KEYWORDS:
            current, block = None, None
        if word in ("config", "menuconfig"):
            current = Definition(rest, path.relative_to(tree), n, list(conds))
            defs.setdefault(rest, []).append(current)
            block = "config"
        elif word in ("menu", "choice"):
            marks.append(len(conds))
            block = word
        elif word in ("endmenu", "endchoice", "endif"):
            if marks:
                del conds[marks.pop() :]
        elif word == "if":
            marks.append(len(conds))
            conds.append(rest)
        elif word == "comment":
            block = "comment"
        elif word in ("source", "rsource", "osource", "orsource"):
            target = rest.strip('"').replace("$(SRCARCH)", arch).replace("$SRCARCH", arch)
            base = path.parent if word in ("rsource", "orsource") else tree
            if "*" in target:
                for p in sorted(base.glob(target)):
                    _parse_file(tree, p, arch, conds, defs, seen)
            else:
                _parse_file(tree, base / target, arch, conds, defs, seen)
        elif word in ("help", "---help---"):
            in_help, help_indent = True, None
        elif stripped.startswith("depends on"):
            expr = stripped[len("depends on") :].strip()
            if block == "config" and current is not None:
                current.depends.append(expr)
            elif block in ("menu", "choice"):
                conds.append(expr)  # applies to the whole block, popped at its end
        elif block == "config" and current is not None:
            if word == "prompt" or (
                word in ("bool", "tristate", "string", "int", "hex") and rest.startswith('"')
            ):
                # "bool "text" if COND": the prompt is visible only when COND holds.
                current.has_prompt = True


# -- expressions -----------------------------------------------------------------------------


def symbol_value(values: dict[str, str], name: str) -> str:
    if name in _TRI:
        return name
    if name.startswith('"'):
        return name[1:-1]
    if re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", name):
        return name
    return values.get(f"CONFIG_{name}", "n").strip('"')


class _Parser:
    def __init__(self, text: str, values: dict[str, str]) -> None:
        self.tokens = _TOKEN.findall(text)
        self.i = 0
        self.values = values

    def _peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def _next(self) -> str:
        tok = self._peek()
        if tok is None:
            raise ValueError("unexpected end of expression")
        self.i += 1
        return tok

    def parse(self) -> int:
        v = self._or()
        if self._peek() is not None:
            raise ValueError(f"unexpected {self._peek()!r}")
        return v

    def _or(self) -> int:
        v = self._and()
        while self._peek() == "||":
            self._next()
            v = max(v, self._and())
        return v

    def _and(self) -> int:
        v = self._not()
        while self._peek() == "&&":
            self._next()
            v = min(v, self._not())
        return v

    def _not(self) -> int:
        if self._peek() == "!":
            self._next()
            return 2 - self._not()
        return self._primary()

    def _primary(self) -> int:
        tok = self._next()
        if tok == "(":
            v = self._or()
            if self._next() != ")":
                raise ValueError("missing ')'")
            return v
        left = symbol_value(self.values, tok)
        op = self._peek()
        if op in ("=", "!=", "<", ">", "<=", ">="):
            self._next()
            right = symbol_value(self.values, self._next())
            return 2 if _compare(left, op, right) else 0
        return _TRI.get(left, 0)


def _compare(a: str, op: str, b: str) -> bool:
    if op in ("=", "!="):
        return (a == b) == (op == "=")
    try:
        x, y = int(a, 0), int(b, 0)
    except ValueError:
        x, y = 0, 0
    return {"<": x < y, ">": x > y, "<=": x <= y, ">=": x >= y}[op]


def evaluate(expr: str, values: dict[str, str]) -> int:
    """Tristate value (0, 1, 2) of a Kconfig expression for a parsed ``.config``."""
    return _Parser(expr, values).parse()


def _symbols_in(expr: str) -> list[str]:
    names = [t for t in _TOKEN.findall(expr) if re.fullmatch(r"[A-Z_][A-Z0-9_]*", t)]
    return list(dict.fromkeys(names))


def explain(index: KconfigIndex, symbol: str, want: str, values: dict[str, str]) -> str:
    """One sentence on why ``symbol`` is not ``want`` in ``values``."""
    defs = index.get(symbol)
    if not defs:
        return "no such option in this kernel's Kconfig (misspelt, or not in this version)"
    need = _TRI.get(want, 2)
    reasons: list[str] = []
    for d in defs:
        where = f"{d.file}:{d.line}"
        blocked = []
        for expr in d.depends:
            try:
                got = evaluate(expr, values)
            except ValueError:
                continue
            if got < need:
                unmet = [
                    f"{s}={symbol_value(values, s)}"
                    for s in _symbols_in(expr)
                    if symbol_value(values, s) in ("n", "m")
                ]
                blocked.append(f"`depends on {expr}` ({', '.join(unmet) or 'false'})")
        if blocked:
            reasons.append(f"blocked by {'; '.join(blocked)} [{where}]")
        elif not d.has_prompt:
            reasons.append(f"has no prompt: only another option's `select` can set it [{where}]")
    if not reasons:
        return "its dependencies hold; another option or a `choice` overrides it"
    return "; ".join(dict.fromkeys(reasons))
