"""Debian's arm64 Python 3.11 for the service VM, and edgevirt's C extension built for it.

Nothing foreign is installed on the host: the .debs come from ``apt-get download`` and are
read by :mod:`edgevirt.image.deb`.

**Which packages.** :func:`resolve_closure` walks ``apt-cache depends`` (Depends and
PreDepends only, one call per round) from :data:`ROOTS`. Recursing with apt-cache's own
``--recurse`` is not usable: through ``media-types``/``mime-support`` → ``mailcap`` it reaches
``perl`` and ``dpkg``, and through ``libc6``'s alternatives ``tar`` and ``install-info`` — a
package manager's world, not an interpreter's. :data:`EXCLUDE` cuts those edges, each with
the reason; what remains is the interpreter, its standard library and the shared libraries
its extension modules link (libc, libffi, libssl, zlib, …, ~20 packages). The exact set and
versions go into the image's cache key and manifest.

**The C extension.** ``edgevirt/backend/virtq/_ring.c`` is compiled with
``aarch64-linux-gnu-gcc`` against the headers of ``libpython3.11-dev:arm64`` (which has both
``/usr/include/python3.11`` and the multiarch ``pyconfig.h``), named with the EXT_SUFFIX the
target's own ``_sysconfigdata`` declares, and checked with pyelftools (AArch64 ELF64 shared
object).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import logging
import marshal
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgevirt import hostreqs
from edgevirt.errors import ImageError, SetupError
from edgevirt.image import unpack
from edgevirt.image.deb import DebMember
from edgevirt.image.elfcheck import ElfInfo, check_elf
from edgevirt.image.initramfs import APT_HINT

log = logging.getLogger(__name__)

ARCH = "arm64"
TRIPLET = "aarch64-linux-gnu"
CROSS_CC = f"{TRIPLET}-gcc"
PY_VERSION = "3.11"
ROOTS: tuple[str, ...] = ("python3.11-minimal", "libpython3.11-stdlib")
DEV_PACKAGE = "libpython3.11-dev"
SYSCONFIGDATA = f"/usr/lib/python{PY_VERSION}/_sysconfigdata__{TRIPLET}.py"

#: Dependency edges not followed, and why (see the module docstring).
EXCLUDE: dict[str, str] = {
    "media-types": "only /etc/mime.types (mimetypes works without it); pulls in mailcap/perl",
    "mime-support": "transitional package for media-types and mailcap",
    "mailcap": "MIME handlers for desktop programs; depends on perl",
    "perl": "not used by Python",
    "perl-base": "not used by Python",
    "dpkg": "a package manager; the image is assembled, not installed",
    "install-info": "documentation tooling",
    "tar": "Python's tarfile is pure Python",
    "readline-common": "inputrc/terminfo data for interactive readline only",
    "libtirpc-common": "/etc/netconfig for Sun RPC; only the unused nis module needs it",
    "debconf": "package configuration at install time",
}

#: Paths (prefixes) in the .debs that a back-end never needs: documentation and the parts of
#: the standard library that are tests, GUIs or installers.
SKIP_PREFIXES: tuple[str, ...] = (
    "/usr/share/doc/", "/usr/share/man/", "/usr/share/lintian/", "/usr/share/locale/",
    "/usr/share/binfmts/", "/usr/share/gcc/", "/usr/share/gdb/", "/usr/share/bug/",
    "/usr/share/info/", "/usr/share/pixmaps/", "/usr/share/applications/",
    f"/usr/lib/python{PY_VERSION}/test/", f"/usr/lib/python{PY_VERSION}/idlelib/",
    f"/usr/lib/python{PY_VERSION}/tkinter/", f"/usr/lib/python{PY_VERSION}/turtledemo/",
    f"/usr/lib/python{PY_VERSION}/ensurepip/", f"/usr/lib/python{PY_VERSION}/lib2to3/",
    f"/usr/lib/python{PY_VERSION}/pydoc_data/", f"/usr/lib/python{PY_VERSION}/unittest/test/",
    f"/usr/lib/python{PY_VERSION}/distutils/tests/", f"/usr/lib/python{PY_VERSION}/ctypes/test/",
    f"/usr/lib/python{PY_VERSION}/sqlite3/test/",
)  # fmt: skip

_DEP = re.compile(r"^\s*(\|?)(PreDepends|Depends): (\S+)$")


@dataclass(frozen=True)
class DebPackage:
    name: str  # as apt resolves it: "libc6:arm64", or "name" for Architecture: all
    version: str
    deb: Path


def _run(cmd: Sequence[str], timeout: float = 300, cwd: Path | None = None) -> str:
    if shutil.which(cmd[0]) is None:
        raise SetupError(f"{cmd[0]} not found", hint="edgevirt needs Debian's apt tools")
    try:
        r = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False
        )
    except subprocess.TimeoutExpired:
        raise ImageError(f"`{' '.join(cmd[:3])} …` took longer than {timeout:.0f} s") from None
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()
        raise ImageError(
            f"`{' '.join(cmd[:3])} …` failed (exit {r.returncode}): "
            f"{tail[-1] if tail else 'no output'}",
            hint=APT_HINT,
        )
    return r.stdout


def _qualify(name: str) -> str:
    return name if ":" in name else f"{name}:{ARCH}"


def _base(name: str) -> str:
    return name.split(":")[0]


def parse_depends(text: str, exclude: Iterable[str] = EXCLUDE) -> dict[str, list[str]]:
    """``apt-cache depends`` output → package → the dependencies to follow.

    Of an alternative group (``|Depends: a`` then ``Depends: b``) the first usable member
    is taken; a virtual package (``<name>``) stands for its first listed provider; excluded
    names (either way) are never taken.
    """
    skip = {_base(n) for n in exclude}
    # package -> groups -> candidates -> names (a real package, or a virtual's providers)
    parsed: dict[str, list[list[list[str]]]] = {}
    groups: list[list[list[str]]] | None = None
    open_group = False
    for line in text.splitlines():
        if not line.startswith(" "):
            groups = parsed.setdefault(line.strip(), [])
            open_group = False
            continue
        if groups is None:
            continue
        m = _DEP.match(line)
        if m is None:  # a provider of the virtual package just listed
            if groups and groups[-1] and line.strip():
                groups[-1][-1].append(line.strip())
            continue
        dep = m.group(3)
        candidate = [] if dep.startswith("<") else [dep]
        if dep.startswith("<") and _base(dep.strip("<>")) in skip:
            candidate = ["<excluded>"]
        if open_group and groups:
            groups[-1].append(candidate)
        else:
            groups.append([candidate])
        open_group = m.group(1) == "|"
    out: dict[str, list[str]] = {}
    for pkg, gs in parsed.items():
        out[pkg] = []
        for group in gs:
            names = [c[0] for c in group if c and c[0] != "<excluded>"]
            usable = [n for n in names if _base(n) not in skip]
            if usable:
                out[pkg].append(usable[0])
    return out


def resolve_closure(
    roots: Sequence[str] = ROOTS, exclude: Iterable[str] = EXCLUDE, *, rounds: int = 32
) -> list[str]:
    """The packages ``roots`` need at run time, as apt names them (sorted)."""
    skip = set(exclude)
    seen: set[str] = set()
    todo = [_qualify(r) for r in roots]
    opts = ["--no-recommends", "--no-suggests", "--no-conflicts", "--no-breaks",
            "--no-replaces", "--no-enhances"]  # fmt: skip
    for _ in range(rounds):
        todo = sorted(set(todo) - seen)
        if not todo:
            return sorted(seen)
        seen.update(todo)
        deps = parse_depends(_run(["apt-cache", "depends", *opts, *todo]), skip)
        todo = [d for ds in deps.values() for d in ds if _base(d) not in skip]
    raise ImageError(f"dependency closure of {', '.join(roots)} did not end in {rounds} rounds")


def package_versions(names: Sequence[str]) -> dict[str, tuple[str, str]]:
    """name → (version, .deb file name) of apt's candidate for each package."""
    text = _run(["apt-cache", "show", "--no-all-versions", *names])
    found: dict[str, tuple[str, str]] = {}
    for stanza in text.strip().split("\n\n"):
        fields = dict(
            (k, v.strip()) for k, _, v in (ln.partition(":") for ln in stanza.splitlines())
            if not k.startswith(" ")
        )  # fmt: skip
        pkg, arch = fields.get("Package", ""), fields.get("Architecture", "")
        key = pkg if arch == "all" and pkg in names else f"{pkg}:{arch}"
        if "Filename" in fields:
            # apt-get download names the file <package>_<version, ':' as %3a>_<arch>.deb
            version = fields["Version"]
            found[key] = (version, f"{pkg}_{version.replace(':', '%3a')}_{arch}.deb")
    missing = [n for n in names if n not in found]
    if missing:
        raise ImageError(f"apt knows no candidate for {', '.join(missing)}", hint=APT_HINT)
    return found


def download(names: Sequence[str], cache: Path) -> list[DebPackage]:
    """The candidate .deb of each package in ``cache`` (``apt-get download`` what is missing)."""
    cache.mkdir(parents=True, exist_ok=True)
    versions = package_versions(names)
    missing = [n for n in names if not (cache / versions[n][1]).exists()]
    if missing:
        log.info("apt-get download %s", " ".join(missing))
        with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
            _run(["apt-get", "download", *missing], cwd=Path(tmp))
            for n in missing:
                got = Path(tmp) / versions[n][1]
                if not got.exists():
                    raise ImageError(f"apt-get download {n}: no {got.name} produced")
                os.replace(got, cache / got.name)
    return [DebPackage(n, versions[n][0], cache / versions[n][1]) for n in names]


# -- unpacking -------------------------------------------------------------------------------


def wanted(path: str) -> bool:
    return not path.startswith(SKIP_PREFIXES) and "/__pycache__/" not in path


def members(debs: Iterable[DebPackage]) -> Iterator[tuple[DebPackage, DebMember]]:
    """Every wanted member of every package, hard links resolved to file contents.

    The members pass :mod:`edgevirt.image.unpack`'s rules; absolute symlink targets are kept
    (they mean the image's root).
    """
    for pkg in debs:
        files: dict[str, DebMember] = {}
        for m in unpack.deb_members(pkg.deb):
            if m.type == "file":
                files[m.path] = m
            if m.type == "hardlink":
                target = files.get(m.linkname)
                if target is None:
                    raise ImageError(f"{pkg.deb}: hard link {m.path} → {m.linkname} not found")
                m = DebMember(m.path, m.mode, "file", target.data)
            if wanted(m.path):
                yield pkg, m


def pyc(source: bytes, guest_path: str) -> bytes | None:
    """An unchecked hash-based .pyc (PEP 552) compiled by this (3.11) interpreter, or None.

    Debian compiles the standard library at install time (py3compile); an assembled image
    must ship the bytecode itself, or every boot of the service VM compiles under TCG.
    """
    if sys.version_info[:2] != (3, 11):
        return None
    try:
        code = compile(source, guest_path, "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return None
    flags = (1).to_bytes(4, "little")  # hash-based, check_source = 0
    return (
        importlib.util.MAGIC_NUMBER
        + flags
        + importlib.util.source_hash(source)
        + (marshal.dumps(code))
    )


def pyc_path(py_path: str) -> str:
    d, _, name = py_path.rpartition("/")
    return f"{d}/__pycache__/{name[:-3]}.{sys.implementation.cache_tag}.pyc"


# -- the C extension -------------------------------------------------------------------------


def ext_suffix(stdlib_debs: Iterable[DebPackage]) -> str:
    """EXT_SUFFIX from the target's own ``_sysconfigdata`` (not the host's)."""
    for pkg in stdlib_debs:
        try:
            text = unpack.read_file(pkg.deb, SYSCONFIGDATA).decode()
        except ImageError:
            continue
        m = re.search(r"'EXT_SUFFIX': '([^']+)'", text)
        if m:
            return m.group(1)
    raise ImageError(f"no package holds {SYSCONFIGDATA} with EXT_SUFFIX")


def python_headers(dev: DebPackage, out: Path) -> Path:
    """``/usr/include`` of ``libpython3.11-dev:arm64`` unpacked under ``out`` (returned)."""
    inc = out / "usr" / "include"
    if (inc / f"python{PY_VERSION}" / "Python.h").exists():
        return inc
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".headers-"))
    try:
        unpack.extract_deb(dev.deb, tmp, select=lambda p: p.startswith("/usr/include/"))
        if not (tmp / "usr/include" / f"python{PY_VERSION}" / "Python.h").exists():
            raise ImageError(f"{dev.deb}: no /usr/include/python{PY_VERSION}/Python.h")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return inc


def extension_sources(setup_py: Path, name: str) -> list[Path]:
    """The ``sources`` of ``Extension(name, sources=[...])`` in ``setup_py`` (read, not run)."""
    try:
        tree = ast.parse(setup_py.read_text(), str(setup_py))
    except (OSError, SyntaxError) as e:
        raise ImageError(f"cannot read the extension list from {setup_py}: {e}") from e
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Extension"):
            continue
        if not (node.args and isinstance(node.args[0], ast.Constant)) or node.args[0].value != name:
            continue
        for kw in node.keywords:
            if kw.arg == "sources" and isinstance(kw.value, ast.List):
                srcs = [e.value for e in kw.value.elts if isinstance(e, ast.Constant)]
                paths = [setup_py.parent / s for s in srcs if isinstance(s, str)]
                if paths and len(paths) == len(kw.value.elts):
                    return paths
    raise ImageError(f"{setup_py}: no Extension({name!r}, sources=[...]) with literal sources")


def cross_compile_extension(sources: Sequence[Path], include: Path, out: Path) -> ElfInfo:
    """Compile C extension ``sources`` into the shared object ``out``; check it is AArch64."""
    if shutil.which(CROSS_CC) is None:
        raise SetupError(f"{CROSS_CC} not found", hint="run `make setup` (gcc-aarch64-linux-gnu)")
    # The compiler alone is not enough: without the arm64 libc headers every source fails
    # on <stdio.h>. Say it is the host, and which package, before compiling anything.
    libc = hostreqs.requirement(hostreqs.ARM64_LIBC)
    ok, detail = libc.probe()
    if not ok:
        raise SetupError(
            f"host build: cannot cross-compile the service VM's C fast path: {detail}",
            hint=f"apt-get install {libc.package} (or `make setup`); `edgevirt doctor` "
            "lists anything else missing",
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [CROSS_CC, "-shared", "-fPIC", "-O2", "-Wall", "-Wextra",
           "-Werror=implicit-function-declaration", f"-I{include / f'python{PY_VERSION}'}",
           f"-I{include}", "-o", str(out), *map(str, sources)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0 or not out.exists():
        errors = [ln for ln in r.stderr.splitlines() if "error" in ln][:5]
        raise ImageError(
            f"cross-compiling {' '.join(s.name for s in sources)} with {CROSS_CC} failed "
            f"(exit {r.returncode}): " + (" | ".join(errors) or r.stderr.strip()[-300:])
        )
    info = check_elf(out, machine="EM_AARCH64", require_static=False)
    if info.elfclass != 64 or info.type != "ET_DYN":
        raise ImageError(f"{out}: {info.describe()}, expected an AArch64 ELF64 shared object")
    return info


def digest(items: Iterable[str | bytes]) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(item.encode() if isinstance(item, str) else item)
        h.update(b"\0")
    return h.hexdigest()[:16]
