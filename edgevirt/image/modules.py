"""Out-of-tree kernel modules, built against the cached kernel tree.

Every directory under ``images/modules/`` that has a ``Kbuild`` (or a ``Makefile``) is one
module source; a spec may add more directories. Each is copied into
``<cache>/modules/<key>/<name>`` and built with ``make -C <tree> M=<that dir> modules``; the
key hashes the kernel's cache key and every source file, so an unchanged module is not
rebuilt and its path (which Kbuild may embed) is stable, which keeps the .ko reproducible.
The headers of ``images/modules/include/`` (what several modules share, such as
``ev_count.h``) are copied beside every module's sources and are part of its key.
A failed build leaves nothing in the cache. Every resulting ``.ko`` is checked with
:func:`edgevirt.image.verify.verify_module` against the kernel's release.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgevirt.errors import ImageError
from edgevirt.image.kernel import CROSS, KernelBuild, Progress, _make, check_tools
from edgevirt.image.verify import ModuleInfo, verify_module
from edgevirt.paths import cache_dir, images_dir

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class BuiltModule:
    name: str  # the source directory's name
    ko: Path  # one .ko (a directory may build several: one BuiltModule each)
    info: ModuleInfo
    source_sha256: str


def modules_dir() -> Path:
    return images_dir() / "modules"


def shared_include_dir() -> Path:
    return modules_dir() / "include"


def discover(extra: Sequence[Path] = ()) -> list[Path]:
    """edgevirt's module directories (with a Kbuild/Makefile), then ``extra`` ones, checked."""
    found = sorted(
        d for d in modules_dir().glob("*") if d.is_dir() and _is_module_dir(d)
    ) if modules_dir().is_dir() else []  # fmt: skip
    for d in extra:
        if not d.is_dir():
            raise ImageError(f"module source {d}: not a directory")
        if not _is_module_dir(d):
            raise ImageError(f"module source {d}: no Kbuild or Makefile (obj-m := name.o)")
        found.append(d)
    names = [d.name for d in found]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ImageError(f"two module directories named {', '.join(dup)}: names must be unique")
    for d in found:
        if not _NAME.fullmatch(d.name):
            raise ImageError(f"module source {d}: name must match [A-Za-z0-9_-]+")
    return found


def _is_module_dir(d: Path) -> bool:
    return (d / "Kbuild").is_file() or (d / "Makefile").is_file()


def _source_files(d: Path) -> list[Path]:
    return sorted(
        p for p in d.rglob("*") if p.is_file() and not p.name.startswith(".") and
        p.suffix not in (".o", ".ko", ".mod", ".cmd", ".order", ".symvers")
    )  # fmt: skip


def source_digest(d: Path) -> str:
    h = hashlib.sha256()
    for p in _source_files(d):
        h.update(f"{p.relative_to(d)}\0{oct(p.stat().st_mode & 0o777)}\0".encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _ensure_symvers(tree: Path) -> None:
    """Module.symvers lets modpost reject undefined symbols; old cache entries lack it."""
    target = tree / "Module.symvers"
    if not target.exists() and (tree / "vmlinux.symvers").exists():
        tmp = target.with_name(f".Module.symvers.{os.getpid()}")
        shutil.copy2(tree / "vmlinux.symvers", tmp)
        os.replace(tmp, target)


def build_modules(
    kernel: KernelBuild, dirs: Sequence[Path], *, progress: Progress | None = None
) -> list[BuiltModule]:
    """Build every directory in ``dirs`` against ``kernel`` (cached), verify each .ko."""
    if not dirs:
        return []
    if not kernel.has_tree:
        raise ImageError(
            f"modules {', '.join(d.name for d in dirs)} need a kernel source tree, "
            f"but kernel {kernel.key} is prebuilt",
            hint="build the kernel from source, or drop the modules from the spec",
        )
    release = kernel.release
    out: list[BuiltModule] = []
    for i, d in enumerate(dirs):
        if progress:
            progress("modules", i, len(dirs))
        out += _build_one(kernel, d, release)
    if progress:
        progress("modules", len(dirs), len(dirs))
    return out


def _build_one(kernel: KernelBuild, src: Path, release: str) -> list[BuiltModule]:
    digest = source_digest(src)
    shared = shared_include_dir()
    shared_digest = source_digest(shared) if shared.is_dir() else ""
    key = hashlib.sha256(
        f"{kernel.key}\0{src.name}\0{digest}\0{shared_digest}".encode()
    ).hexdigest()[:16]
    root = cache_dir() / "modules" / key
    build = root / src.name
    root.parent.mkdir(parents=True, exist_ok=True)
    # Kbuild may embed the build path, so it is fixed per key: concurrent builds take turns.
    with open(root.parent / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "built.json").exists():
            _build_into(kernel, src, root, build, digest, release)
        names = json.loads((root / "built.json").read_text())["ko"]
    result = []
    for ko_name in names:
        info = verify_module(build / ko_name, release=release)
        result.append(BuiltModule(src.name, build / ko_name, info, digest))
    log.info("modules %s: %s", src.name, ", ".join(names))
    return result


def _build_into(
    kernel: KernelBuild, src: Path, root: Path, build: Path, digest: str, release: str
) -> None:
    """Build into ``root``; on any failure remove it (and keep the log beside the cache)."""
    check_tools()
    _ensure_symvers(kernel.source)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    try:
        shutil.copytree(src, build, ignore=shutil.ignore_patterns(".*", "*.o", "*.ko"))
        shared = shared_include_dir()
        for header in _source_files(shared) if shared.is_dir() else []:
            if not (build / header.name).exists():  # the module's own file of that name wins
                shutil.copy2(header, build / header.name)
        with open(root / "build.log", "w") as logf:
            _make(kernel.source, [f"M={build}", "modules"], logf, None, 1)
        kos = sorted(p.name for p in build.glob("*.ko"))
        if not kos:
            raise ImageError(f"module {src}: the build produced no .ko (check obj-m in Kbuild)")
        (root / "built.json").write_text(
            json.dumps({"source": str(src), "sha256": digest, "ko": kos})
        )
    except ImageError as e:
        log_path = root / "build.log"
        lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
        errors = [ln.strip() for ln in lines if "error" in ln.lower()][:5]
        failed = cache_dir() / "modules" / f"failed-{src.name}.log"
        if log_path.exists():
            shutil.copy2(log_path, failed)
        shutil.rmtree(root, ignore_errors=True)
        raise ImageError(
            f"module {src.name} ({src}) failed to build against kernel {release}: "
            + (" | ".join(errors) or str(e))
            + f"; log: {failed}",
        ) from e
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


__all__ = ["BuiltModule", "build_modules", "discover", "modules_dir", "source_digest", "CROSS"]
