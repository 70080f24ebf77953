"""Build (or reuse) the guest kernel: Debian's linux-source, a user tree/tarball, or a prebuilt.

Debian's own arm64 kernels lack CONFIG_DMA_RESTRICTED_POOL, so edgevirt builds its own:
``allnoconfig`` + the fragments (``images/kernel/*.config``, then the user's) +
``olddefconfig``, then ``Image modules_prepare``. Every option a fragment asks for is checked
in the final ``.config``; one that did not stick is reported with the Kconfig dependency that
blocked it (:mod:`edgevirt.image.kconfig`).

The result is cached under ``<cache>/kernel/<key>``; the key hashes every input (source
identity, the fragments' bytes in order, the cross compiler's version, this recipe's
version). A build runs in a private staging directory and is renamed into place only when it
succeeded, so a failed or interrupted build (``--rebuild`` included) never touches a good
cache entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from edgevirt.errors import ImageError, SetupError
from edgevirt.image.cachelock import build_lock, remove_stale_stages
from edgevirt.paths import cache_dir, images_dir

if TYPE_CHECKING:
    from edgevirt.image.kconfig import KconfigIndex

log = logging.getLogger(__name__)

#: Bump when the build recipe changes in a way that changes the output.
RECIPE_VERSION = 1
SOURCE_PACKAGE = "linux-source-6.1"
CROSS = "aarch64-linux-gnu-"
#: Rough count of compile steps for our config; refined from the last build's log.
DEFAULT_STEPS = 1500
#: An extracted and built 6.1 tree is ~1.6 GiB; leave room for the tarball's extraction.
MIN_FREE_BYTES = 3 << 30
#: Host tool -> the Debian package that provides it.
Progress = Callable[[str, int, int], None]  # (phase, done, total)


# -- inputs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelSource:
    """Where the kernel comes from.

    ``debian``: ``/usr/src/linux-source-6.1.tar.xz``; ``tarball``: a user's kernel tarball
    (one top-level directory); ``tree``: a user's source tree (copied, never built in
    place); ``prebuilt``: a ready ``Image`` (``path``) and optionally its ``vmlinux``.
    """

    kind: str = "debian"
    path: Path | None = None
    vmlinux: Path | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("debian", "tarball", "tree", "prebuilt"):
            raise ImageError(
                f"kernel source kind {self.kind!r} is not debian/tarball/tree/prebuilt"
            )
        if self.kind != "debian" and self.path is None:
            raise ImageError(f"kernel source {self.kind!r} needs a path")
        for p in (self.path, self.vmlinux):
            if p is not None and not p.exists():
                raise ImageError(f"kernel {self.kind}: {p} does not exist")

    def describe(self) -> str:
        return SOURCE_PACKAGE if self.kind == "debian" else f"{self.kind} {self.path}"


@dataclass(frozen=True)
class KernelBuild:
    key: str
    dir: Path
    #: Wall seconds this call spent building it (0.0 when it came from the cache).
    built_seconds: float = 0.0

    @property
    def image(self) -> Path:
        return self.dir / "Image"

    @property
    def vmlinux(self) -> Path:
        return self.dir / "vmlinux"

    @property
    def config(self) -> Path:
        return self.dir / "config"

    @property
    def source(self) -> Path:
        """The configured and built tree: out-of-tree modules build against it."""
        return self.dir / "src"

    @property
    def log(self) -> Path:
        return self.dir / "build.log"

    @property
    def release(self) -> str:
        return (self.dir / "release").read_text().strip()

    @property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.dir / "meta.json").read_text())

    @property
    def has_tree(self) -> bool:
        return (self.source / "Makefile").exists()


def pkg_version(pkg: str) -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError) as e:
        raise SetupError(
            f"package {pkg} is not installed", hint=f"run `make setup` or `apt-get install {pkg}`"
        ) from e
    return out.stdout.strip()


_pkg_version = pkg_version  # the name older callers use


def source_tarball() -> Path:
    matches = sorted(Path("/usr/src").glob(f"{SOURCE_PACKAGE}.tar.*"))
    if not matches:
        raise SetupError(
            f"/usr/src/{SOURCE_PACKAGE}.tar.xz not found",
            hint=f"run `make setup` or `apt-get install {SOURCE_PACKAGE}`",
        )
    return matches[0]


def fragments_dir() -> Path:
    return images_dir() / "kernel"


def default_fragments() -> list[Path]:
    """edgevirt's own fragments, in name order: ``images/kernel/*.config``."""
    return sorted(fragments_dir().glob("*.config"))


def default_fragment() -> Path:
    """The main fragment (kept for callers that pass a single one)."""
    return fragments_dir() / "edgevirt.config"


def parse_fragment(text: str, origin: str = "fragment") -> dict[str, str]:
    """``CONFIG_X=y`` / ``# CONFIG_X is not set`` lines → {name: value ('n' for not set)}."""
    opts: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        m = re.fullmatch(r"# (CONFIG_\w+) is not set", line)
        if m:
            opts[m.group(1)] = "n"
            continue
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"(CONFIG_\w+)=(.+)", line)
        if not m:
            raise ImageError(f"{origin}:{n}: expected CONFIG_NAME=value, got {line!r}")
        opts[m.group(1)] = m.group(2)
    return opts


def read_fragments(fragments: Sequence[Path]) -> dict[str, str]:
    """Merge fragments in order (a later one overrides), each line checked."""
    wanted: dict[str, str] = {}
    for f in fragments:
        try:
            text = f.read_text()
        except OSError as e:
            raise ImageError(f"kernel fragment {f}: {e.strerror}") from e
        wanted.update(parse_fragment(text, str(f)))
    return wanted


def _tree_digest(tree: Path) -> str:
    """Identity of a user tree without reading 1 GiB: every file's path, size and mtime."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(tree):
        dirs[:] = sorted(d for d in dirs if d != ".git")
        for name in sorted(files):
            p = Path(root, name)
            st = p.lstat()
            h.update(f"{p.relative_to(tree)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_id(source: KernelSource) -> str:
    if source.kind == "debian":
        return f"{SOURCE_PACKAGE}={pkg_version(SOURCE_PACKAGE)}"
    assert source.path is not None
    if source.kind == "tree":
        return f"tree:{source.path.resolve()}:{_tree_digest(source.path)}"
    return f"{source.kind}:{source.path.name}:sha256={file_sha256(source.path)}"


def key_inputs(
    fragments: Path | Sequence[Path], source: KernelSource | None = None
) -> dict[str, Any]:
    """Everything the kernel's bytes depend on (also recorded in the image manifest)."""
    frags = [fragments] if isinstance(fragments, Path) else list(fragments)
    # The merged bytes are exactly what is appended to .config: hashing them is the input.
    merged = b"".join(f.read_bytes() for f in frags)
    return {
        "recipe": RECIPE_VERSION,
        "source": source_id(source or KernelSource()),
        "cross": f"gcc-aarch64-linux-gnu={pkg_version('gcc-aarch64-linux-gnu')}",
        "fragment": hashlib.sha256(merged).hexdigest(),
    }


def cache_key(fragments: Path | Sequence[Path], source: KernelSource | None = None) -> str:
    inputs = key_inputs(fragments, source)
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


# -- host checks -----------------------------------------------------------------------------


def check_tools() -> None:
    """The doctor table's kernel-build rows (one source of truth); the Debian source package
    is checked only when it is the source (``KernelSource``)."""
    from edgevirt import hostreqs

    missing = [
        f.req
        for f in hostreqs.check(["kernel"])
        if not f.ok and f.req.name != "linux-source-6.1" and f.req.package
    ]
    if missing:
        raise SetupError(
            "kernel build tools missing: "
            + ", ".join(f"{r.name} (apt package {r.package})" for r in missing),
            hint="run `make setup` or `apt-get install "
            + " ".join(sorted({r.package for r in missing if r.package}))
            + "`",
        )


def check_space(where: Path, need: int = MIN_FREE_BYTES) -> None:
    free = shutil.disk_usage(where).free
    if free < need:
        raise SetupError(
            f"no disk space for a kernel build: {free / 2**30:.1f} GiB free in {where}, "
            f"need {need / 2**30:.1f} GiB",
            hint="free some space, or point EDGEVIRT_CACHE at a larger disk",
        )


# -- the build -------------------------------------------------------------------------------


def _extract(tarball: Path, dest: Path, progress: Progress | None) -> None:
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # tar(1) is several times faster than tarfile on a 130 MiB xz; tarfile only lists.
    if progress:
        progress("extract", 0, 1)
    r = subprocess.run(
        ["tar", "-xf", str(tarball), "-C", str(tmp), "--strip-components=1"],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        raise ImageError(f"extracting {tarball} failed: {r.stderr.strip()[-500:]}")
    if progress:
        progress("extract", 1, 1)
    tmp.rename(dest)


def _copy_tree(tree: Path, dest: Path) -> None:
    """Copy a user tree (without .git): the build writes into the copy, never the original."""
    dest.mkdir(parents=True)
    pack = subprocess.Popen(
        ["tar", "-C", str(tree), "--exclude=./.git", "-cf", "-", "."], stdout=subprocess.PIPE
    )
    unpack = subprocess.run(["tar", "-C", str(dest), "-xf", "-"], stdin=pack.stdout, check=False)
    if pack.wait() or unpack.returncode:
        raise ImageError(f"copying kernel tree {tree} failed")


def check_kernel_tree(tree: Path, origin: str) -> str:
    """A Linux source tree with arm64 support; returns its ``VERSION.PATCHLEVEL.SUBLEVEL``."""
    mk = tree / "Makefile"
    text = mk.read_text(errors="replace") if mk.is_file() else ""
    fields = dict(re.findall(r"^(VERSION|PATCHLEVEL|SUBLEVEL) = (\d*)$", text, re.M))
    if "VERSION" not in fields or not (tree / "Kconfig").is_file():
        raise ImageError(
            f"{origin} is not a Linux kernel source: no top-level Makefile with "
            "VERSION/PATCHLEVEL and Kconfig",
            hint="give the kernel's top directory (the one with MAINTAINERS and Kconfig)",
        )
    if not (tree / "arch/arm64/Kconfig").is_file():
        raise ImageError(f"{origin}: kernel source without arch/arm64: cannot build for aarch64")
    return ".".join(fields.get(k, "0") or "0" for k in ("VERSION", "PATCHLEVEL", "SUBLEVEL"))


def _prepare_source(source: KernelSource, dest: Path, progress: Progress | None) -> str:
    if source.kind == "tree":
        assert source.path is not None
        check_kernel_tree(source.path, f"kernel tree {source.path}")
        _copy_tree(source.path, dest)
    else:
        tarball = source_tarball() if source.kind == "debian" else source.path
        assert tarball is not None
        if source.kind == "tarball":  # a user's archive: the unpacking rules first
            from edgevirt.image.unpack import check_tarball

            check_tarball(tarball)
        _extract(tarball, dest, progress)
    return check_kernel_tree(dest, source.describe())


def _make(
    src: Path,
    args: list[str],
    logf: IO[str],
    progress: Progress | None,
    total: int,
    lines: list[str] | None = None,
) -> int:
    cmd = ["make", f"-j{os.cpu_count() or 1}", "ARCH=arm64", f"CROSS_COMPILE={CROSS}", *args]
    logf.write(f"$ {' '.join(cmd)}\n")
    logf.flush()
    proc = subprocess.Popen(
        cmd, cwd=src, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    steps = 0
    assert proc.stdout is not None
    for line in proc.stdout:
        logf.write(line)
        if lines is not None:
            lines.append(line.rstrip("\n"))
        # Kbuild's quiet output: one "  CC  file" line per compile step.
        if line.startswith(("  CC", "  AS", "  LD", "  AR")):
            steps += 1
            if progress:
                progress("compile", min(steps, total), total)
    rc = proc.wait()
    logf.flush()
    if rc:
        raise ImageError(
            f"kernel `make {' '.join(args)}` failed (exit {rc}); see {logf.name}",
            hint="the last lines of the log show the compiler error",
        )
    return steps


def _last_steps() -> int:
    root = cache_dir() / "kernel"
    for meta in sorted(root.glob("*/meta.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            return int(json.loads(meta.read_text())["steps"]) or DEFAULT_STEPS
        except (ValueError, KeyError, OSError):
            continue
    return DEFAULT_STEPS


def config_values(config_text: str) -> dict[str, str]:
    return parse_fragment(
        "\n".join(ln for ln in config_text.splitlines() if ln.startswith(("CONFIG_", "# CONFIG_")))
    )


def check_config(
    config_text: str,
    wanted: dict[str, str],
    origin: str,
    tree: Path | None = None,
    kconfig_warnings: Sequence[str] = (),
    index: KconfigIndex | None = None,
) -> None:
    """Every option asked for must be set as asked; else name each and why (Kconfig of
    ``tree``, loaded only now, or an ``index`` already loaded)."""
    have = config_values(config_text)
    misses = [(k, v, have.get(k, "n")) for k, v in wanted.items() if have.get(k, "n") != v]
    if not misses:
        return
    if index is None and tree is not None:
        from edgevirt.image import kconfig

        index = kconfig.load(tree)
    lines = []
    for k, v, got in misses:
        why = ""
        if index is not None:
            from edgevirt.image.kconfig import explain

            why = ": " + explain(index, k, v, have)
        lines.append(f"{k}={v} (got {got}){why}")
    warned = [w.strip() for w in kconfig_warnings if "warning:" in w]
    raise ImageError(
        f"{origin}: {len(misses)} option(s) did not survive olddefconfig: "
        + "; ".join(lines)
        + (f" [Kconfig said: {' | '.join(warned[:5])}]" if warned else ""),
        hint="add the blocking dependency to your fragment, or drop the option",
    )


def kernel_release(src: Path) -> str:
    return subprocess.run(
        ["make", "-s", "ARCH=arm64", f"CROSS_COMPILE={CROSS}", "kernelrelease"],
        cwd=src,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def _install(stage: Path, final: Path) -> None:
    """Rename the finished staging dir into place; a previous entry goes only afterwards."""
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    if final.exists():
        final.rename(old)
    stage.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def build_kernel(
    fragment: Path | None = None,
    *,
    fragments: Sequence[Path] | None = None,
    source: KernelSource | None = None,
    force: bool = False,
    progress: Progress | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> KernelBuild:
    """Return the cached build for these inputs, building it first if needed (or ``force``).

    One build per key at a time: a second caller waits (``on_wait`` hears why) and then
    uses the first one's result.

    ``fragment`` (one file) replaces edgevirt's fragments; ``fragments`` is the full ordered
    list (see :func:`default_fragments`). A ``prebuilt`` source is checked, not built.
    """
    source = source or KernelSource()
    if source.kind == "prebuilt":
        return use_prebuilt(source)
    frags = [fragment] if fragment else list(fragments or default_fragments())
    if not frags:
        raise ImageError(f"no kernel config fragments (looked in {fragments_dir()})")
    wanted = read_fragments(frags)
    inputs = key_inputs(frags, source)
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    root = cache_dir() / "kernel"
    kb = KernelBuild(key=key, dir=root / key)
    if _cached(kb) and not force:
        log.info("kernel %s cached at %s", key, kb.dir)
        return kb
    check_tools()
    root.mkdir(parents=True, exist_ok=True)
    with build_lock(root, key, on_wait=on_wait):
        # Whoever held the lock may just have built it.
        if _cached(kb) and not force:
            return kb
        remove_stale_stages(root, key)
        check_space(root)
        t0 = time.monotonic()
        _build(kb, root, frags, wanted, inputs, source, progress)
        kb = replace(kb, built_seconds=time.monotonic() - t0)
    return kb


def _cached(kb: KernelBuild) -> bool:
    return (kb.dir / "meta.json").exists() and kb.image.exists()


def _build(
    kb: KernelBuild,
    root: Path,
    frags: Sequence[Path],
    wanted: dict[str, str],
    inputs: dict[str, object],
    source: KernelSource,
    progress: Progress | None,
) -> None:
    key = kb.key
    stage = root / f".build-{key}-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    src = stage / "src"
    log_path = stage / "build.log"
    try:
        version = _prepare_source(source, src, progress)
        total = _last_steps()
        with open(log_path, "w") as logf:
            _make(src, ["allnoconfig"], logf, None, 1)
            with open(src / ".config", "a") as cfg:
                for f in frags:
                    cfg.write(f"\n# edgevirt fragment {f.name}\n" + f.read_text())
            conf_out: list[str] = []
            _make(src, ["olddefconfig"], logf, None, 1, conf_out)
            check_config(
                (src / ".config").read_text(),
                wanted,
                ", ".join(str(f) for f in frags),
                tree=src,
                kconfig_warnings=conf_out,
            )
            steps = _make(src, ["Image", "modules_prepare"], logf, progress, total)
            rel = kernel_release(src)
        # External modules' modpost needs the kernel's exports to catch undefined symbols.
        if (src / "vmlinux.symvers").exists():
            shutil.copy2(src / "vmlinux.symvers", src / "Module.symvers")
        shutil.copy2(src / "arch/arm64/boot/Image", stage / "Image")
        shutil.copy2(src / "vmlinux", stage / "vmlinux")
        shutil.copy2(src / ".config", stage / "config")
        (stage / "release").write_text(rel + "\n")
        meta = {
            "key": key,
            "release": rel,
            "version": version,
            "steps": steps,
            "source": source.describe(),
            "inputs": inputs,
            "fragments": [str(f) for f in frags],
        }
        (stage / "meta.json").write_text(json.dumps(meta, indent=2))
        _install(stage, kb.dir)
    except BaseException:
        # Keep the log where the user can read it; the cache entry itself is untouched.
        if log_path.exists():
            shutil.copy2(log_path, root / f"failed-{key}.log")
        shutil.rmtree(stage, ignore_errors=True)
        raise


def failed_log(key: str) -> Path:
    return cache_dir() / "kernel" / f"failed-{key}.log"


# -- prebuilt --------------------------------------------------------------------------------


def use_prebuilt(source: KernelSource) -> KernelBuild:
    """Check a prebuilt Image (+ vmlinux) and give it a cache entry like a built kernel."""
    from edgevirt.image.verify import image_release, verify_image, verify_vmlinux

    assert source.path is not None
    verify_image(source.path)
    rel = image_release(source.path)
    vm = verify_vmlinux(source.vmlinux, release=rel) if source.vmlinux else None
    h = hashlib.sha256(source.path.read_bytes())
    if source.vmlinux:
        h.update(source.vmlinux.read_bytes())
    key = "prebuilt-" + h.hexdigest()[:16]
    kb = KernelBuild(key=key, dir=cache_dir() / "kernel" / key)
    if not (kb.dir / "meta.json").exists():
        stage = kb.dir.with_name(f".build-{key}-{os.getpid()}")
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        shutil.copy2(source.path, stage / "Image")
        if source.vmlinux:
            shutil.copy2(source.vmlinux, stage / "vmlinux")
        if vm is not None and vm.config is not None:
            (stage / "config").write_text(vm.config)
        (stage / "release").write_text(rel + "\n")
        meta = {"key": key, "release": rel, "source": source.describe(), "prebuilt": True}
        (stage / "meta.json").write_text(json.dumps(meta, indent=2))
        _install(stage, kb.dir)
    return kb
