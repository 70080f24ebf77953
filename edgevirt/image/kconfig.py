"""Why did an option from a fragment not survive ``olddefconfig``? Ask Kconfig itself.

Kconfig silently drops a requested ``CONFIG_X=y`` whose dependencies are unmet, and its own
warnings only name the option (``merge_config.sh``: "Value requested for CONFIG_X not in
final .config"). This module loads the tree's Kconfig with **kconfiglib** (14.1.0, a full
Kconfig implementation in Python: ``if``/``menu``/``visible if``, choices, ``select``,
``imply``, every definition of a symbol, the ``$(shell,…)`` preprocessor) and answers the
user's real question: *which* condition blocked it, naming only the parts that fail.

Two things make kconfiglib 14.1.0 read Linux 6.1 as the C tools do:

- **the ``modules`` keyword** (Linux 5.13+ writes ``modules`` where older trees had
  ``option modules``; kconfiglib 14.1.0 predates it): :class:`_Kconfig` rewrites that one
  line as it reads the file;
- **the environment** the kernel's Makefile exports to ``conf`` (``srctree``, ``SRCARCH``,
  ``CC``, ``CC_VERSION_TEXT``, …): :func:`kconfig_env`. Kconfig probes the toolchain with
  ``$(success,…)``; the probes run in a private directory, never in the tree.

A differential test (``tests/test_kernel_config.py``) checks every arm64 symbol against the
real ``conf --olddefconfig`` on the same input. Loading arm64 takes ~5 s: done only when a
check failed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import kconfiglib

log = logging.getLogger(__name__)

CROSS = "aarch64-linux-gnu-"
_TRI = {"n": 0, "m": 1, "y": 2}
_TRI_NAME = ("n", "m", "y")
_MODULES_LINE = re.compile(r"^(\s+)modules[ \t]*$", re.M)


class _Kconfig(kconfiglib.Kconfig):
    """kconfiglib with the ``modules`` keyword of Linux 5.13+ read as ``option modules``."""

    def _open(self, filename: str, mode: str) -> IO[Any]:
        if mode == "r" and "Kconfig" in os.path.basename(filename):
            with open(filename, encoding="utf-8", errors="surrogateescape") as f:
                text = f.read()
            if _MODULES_LINE.search(text):
                return io.StringIO(_MODULES_LINE.sub(r"\1option modules", text))
            return io.StringIO(text)
        return super()._open(filename, mode)  # type: ignore[no-any-return]


def _kernelversion(tree: Path) -> str:
    text = (tree / "Makefile").read_text(errors="replace")
    fields = dict(re.findall(r"^(VERSION|PATCHLEVEL|SUBLEVEL) = (\d*)$", text, re.M))
    return ".".join(fields.get(k, "0") or "0" for k in ("VERSION", "PATCHLEVEL", "SUBLEVEL"))


def kconfig_env(tree: Path, arch: str = "arm64", cross: str = CROSS) -> dict[str, str]:
    """The variables the kernel's Makefile exports that Kconfig files read."""
    cc = f"{cross}gcc"
    try:
        first = subprocess.run(
            [cc, "--version"], capture_output=True, text=True, check=False
        ).stdout.splitlines()
    except OSError:
        first = []
    return {
        "srctree": str(tree),
        "SRCARCH": arch,
        "ARCH": arch,
        "KERNELVERSION": _kernelversion(tree),
        "CC": cc,
        "LD": f"{cross}ld",
        "NM": f"{cross}nm",
        "OBJCOPY": f"{cross}objcopy",
        "CC_VERSION_TEXT": first[0].replace("#", "") if first else "",
        "CLANG_FLAGS": "",
        "PAHOLE": "pahole",
        "RUSTC": "rustc",
        "BINDGEN": "bindgen",
        "HOSTCC": "gcc",
        "HOSTCXX": "g++",
    }


_probe_dir: str | None = None  # where $(shell,...) runs while a tree is being loaded


def _shell(kconf: Any, _name: str, command: str) -> str:
    """kconfiglib's ``$(shell,…)``, run in a private directory: the toolchain probes
    (``cc-option`` makes ``.tmp_$$`` in its working directory) never touch the tree or the
    caller's directory, and the process's working directory is left alone."""
    r = subprocess.run(command, shell=True, capture_output=True, cwd=_probe_dir, check=False)  # noqa: S602 - the kernel's own Kconfig macros
    out = r.stdout.decode("utf-8", "replace")
    return "\n".join(out.splitlines()).rstrip("\n").replace("\n", " ")


#: Picked up by kconfiglib through ``KCONFIG_FUNCTIONS`` (overrides its ``shell``).
functions = {"shell": (_shell, 1, 1)}


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """Kconfig's ``$(VAR)`` reads os.environ while parsing (restored afterwards)."""
    global _probe_dir
    saved = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="edgevirt-kconfig-") as tmp:
        os.environ.update(env)
        os.environ["KCONFIG_FUNCTIONS"] = __name__
        _probe_dir = tmp
        try:
            yield
        finally:
            _probe_dir = None
            os.environ.clear()
            os.environ.update(saved)


@dataclass
class Definition:
    """One ``config SYM`` entry: where it is, what it depends on, whether a user can set it."""

    symbol: str
    file: Path
    line: int
    depends: list[str]  # its full dependency (own + enclosing if/menu), as Kconfig text
    has_prompt: bool


@dataclass
class KconfigIndex:
    kconf: kconfiglib.Kconfig
    tree: Path

    def get(self, symbol: str) -> list[Definition]:
        sym = self.kconf.syms.get(symbol.removeprefix("CONFIG_"))
        if sym is None:
            return []
        return [
            Definition(sym.name, self._rel(n.filename), n.linenr,
                       [kconfiglib.expr_str(n.dep)], n.prompt is not None)
            for n in sym.nodes
        ]  # fmt: skip

    def _rel(self, filename: str) -> Path:
        p = Path(filename)
        return p.relative_to(self.tree) if p.is_absolute() and p.is_relative_to(self.tree) else p

    def load_config(self, text: str) -> None:
        """Take ``text`` (a .config, or a merged input) as the current values."""
        with tempfile.NamedTemporaryFile("w", suffix=".config", delete=False) as f:
            f.write(text)
        try:
            self.kconf.load_config(f.name, replace=True)
        finally:
            os.unlink(f.name)

    def config_text(self) -> str:
        """What ``olddefconfig`` writes for the current values."""
        with tempfile.TemporaryDirectory(prefix="edgevirt-kconfig-") as tmp:
            out = Path(tmp) / ".config"
            self.kconf.write_config(str(out), header="", save_old=False)
            return out.read_text()


def load(tree: Path, arch: str = "arm64") -> KconfigIndex:
    """Parse ``<tree>/Kconfig`` for ``arch`` (every symbol, every definition)."""
    tree = Path(tree).resolve()
    with _environment(kconfig_env(tree, arch)):
        try:
            kconf = _Kconfig(str(tree / "Kconfig"), warn=False, warn_to_stderr=False)
        except kconfiglib.KconfigError as e:
            from edgevirt.errors import ImageError

            raise ImageError(f"{tree}: Kconfig could not be parsed: {e}") from e
    log.debug("kconfig: %d symbols from %s", len(kconf.unique_defined_syms), tree)
    return KconfigIndex(kconf, tree)


def allnoconfig(index: KconfigIndex) -> str:
    """``make allnoconfig``'s .config: every settable symbol n (``allnoconfig_y`` ones y)."""
    for sym in index.kconf.unique_defined_syms:
        sym.set_value(2 if sym.is_allnoconfig_y else 0)
    return index.config_text()


def olddefconfig(index: KconfigIndex, config: str) -> str:
    """``make olddefconfig`` on ``config`` (later assignments override earlier ones)."""
    index.load_config(config)
    return index.config_text()


# -- explanations ------------------------------------------------------------------------------


def _values_text(values: dict[str, str]) -> str:
    lines = []
    for k, v in values.items():
        lines.append(f"# {k} is not set" if v == "n" else f"{k}={v}")
    return "\n".join(lines) + "\n"


def _shown(sym: Any) -> str:
    if isinstance(sym, kconfiglib.Symbol) and not sym.is_constant:
        return f"{sym.name}={sym.str_value or 'n'}"
    return ""


def _failing(expr: Any, need: int) -> list[str]:
    """The AND-operands of ``expr`` whose value is below ``need``, with their symbols'
    values: what actually blocks, not every symbol the expression mentions."""
    out = []
    for op in kconfiglib.split_expr(expr, kconfiglib.AND):
        if kconfiglib.expr_value(op) >= need:
            continue
        vals = [v for v in dict.fromkeys(_shown(s) for s in kconfiglib.expr_items(op)) if v]
        text = kconfiglib.expr_str(op)
        single = len(vals) == 1 and vals[0].split("=")[0] == text
        out.append(vals[0] if single else f"`{text}` ({', '.join(vals) or 'false'})")
    return out


def _holders(expr: Any, above: int) -> list[str]:
    """The OR-operands of a select/imply expression whose value exceeds ``above``."""
    out = []
    for op in kconfiglib.split_expr(expr, kconfiglib.OR):
        if kconfiglib.expr_value(op) > above:
            out.append(kconfiglib.expr_str(op))
    return out


def explain(index: KconfigIndex, symbol: str, want: str, values: dict[str, str]) -> str:
    """One sentence on why ``symbol`` is not ``want`` in ``values`` (a parsed ``.config``)."""
    sym = index.kconf.syms.get(symbol.removeprefix("CONFIG_"))
    if sym is None or not sym.nodes:
        return "no such option in this kernel's Kconfig (misspelt, or not in this version)"
    index.load_config(_values_text(values))
    where = [f"{index._rel(n.filename)}:{n.linenr}" for n in sym.nodes]
    if sym.orig_type not in (kconfiglib.BOOL, kconfiglib.TRISTATE):
        return _explain_value(index, sym, want, where)
    need = _TRI.get(want.strip('"'), 2)
    have = sym.tri_value
    if need > have:
        can = "/".join(_TRI_NAME[a] for a in sym.assignable)
        return "; ".join(dict.fromkeys(_why_lower(index, sym, need))) or (
            f"its dependencies hold and it can be {want} (assignable: {can}): the request "
            f"was not applied (a later line sets it, or the line is malformed) [{where[0]}]"
        )
    if need < have:
        return "; ".join(_why_higher(sym, need, where))
    return f"it is {want} with these values [{where[0]}]"


def _why_lower(index: KconfigIndex, sym: Any, need: int) -> Iterator[str]:
    """Why ``sym`` stays below ``need``: its dependencies, prompt, choice, select."""
    if sym.choice is not None and sym.visibility >= need:
        chosen = sym.choice.selection
        if chosen is not None and chosen is not sym:
            node = sym.choice.nodes[0]
            yield (f"it is in a choice where {chosen.name} is selected "
                   f"[{index._rel(node.filename)}:{node.linenr}]")  # fmt: skip
            return
    if sym.visibility >= need:
        return
    selectors = _holders(sym.rev_dep, 0) if sym.rev_dep is not index.kconf.n else []
    prompted = [n for n in sym.nodes if n.prompt is not None]
    for node in sym.nodes:
        loc = f"{index._rel(node.filename)}:{node.linenr}"
        blocked = _failing(node.dep, need)
        if blocked:
            dep = kconfiglib.expr_str(node.dep)
            yield f"blocked by `depends on {dep}`: {', '.join(blocked)} [{loc}]"
        elif node.prompt is not None and kconfiglib.expr_value(node.prompt[1]) < need:
            hidden = _failing(node.prompt[1], need)
            menus = [
                kconfiglib.expr_str(p.visibility)
                for p in _parents(node)
                if p.item is kconfiglib.MENU and kconfiglib.expr_value(p.visibility) < need
            ]
            how = f"its menu is `visible if {menus[0]}`" if menus else "its prompt is conditional"
            yield f"{how}: {', '.join(hidden) or 'false'} [{loc}]"
    if not prompted:
        sel = [s.name for s in _selector_syms(sym)]
        by = f"selected only by {', '.join(sel)}, none of them set" if sel else "nothing selects it"
        node = sym.nodes[0]
        yield (f"has no prompt: only another option's `select` can set it ({by}) "
               f"[{index._rel(node.filename)}:{node.linenr}]")  # fmt: skip
    elif selectors:
        yield f"selected by {', '.join(selectors)}, which is not enough here"


def _why_higher(sym: Any, need: int, where: list[str]) -> Iterator[str]:
    """Why ``sym`` is above ``need``: a select, an imply without a prompt, a default."""
    forced = _holders(sym.rev_dep, need)
    if forced:
        yield f"forced to {sym.str_value} by `select` from {', '.join(forced)}"
        return
    if sym.choice is not None and sym.choice.selection is sym:
        yield "it is the selected entry of its choice (select another entry instead)"
        return
    if sym.visibility <= need:
        implied = _holders(sym.weak_rev_dep, need)
        if implied:
            yield f"implied by {', '.join(implied)} and it has no visible prompt"
        else:
            yield f"it has no visible prompt: its default {sym.str_value} applies [{where[0]}]"
        return
    yield f"a later assignment or `imply` set it to {sym.str_value} [{where[0]}]"


def _explain_value(index: KconfigIndex, sym: Any, want: str, where: list[str]) -> str:
    if sym.visibility == 0:
        return "; ".join(_why_lower(index, sym, 2)) or f"it has no prompt [{where[0]}]"
    for low, high, cond in sym.ranges:
        if kconfiglib.expr_value(cond):
            return (f"it is {sym.str_value}: {want} may be outside its range "
                    f"[{low.str_value}, {high.str_value}] [{where[0]}]")  # fmt: skip
    return f"it is {sym.str_value} [{where[0]}]"


def _parents(node: Any) -> Iterator[Any]:
    p = node.parent
    while p is not None:
        yield p
        p = p.parent


def _selector_syms(sym: Any) -> list[Any]:
    out = []
    for op in kconfiglib.split_expr(sym.rev_dep, kconfiglib.OR):
        first = op[1] if isinstance(op, tuple) else op
        if isinstance(first, kconfiglib.Symbol) and not first.is_constant:
            out.append(first)
    return out
