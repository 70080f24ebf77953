"""Build the guest kernel from Debian's linux-source with edgevirt's config fragment.

Debian's own arm64 kernels lack CONFIG_DMA_RESTRICTED_POOL, so edgevirt builds its own:
``allnoconfig`` + fragment + ``olddefconfig``, then ``Image``. The result is cached under
``<cache>/kernel/<key>`` where the key hashes every input (source package version, fragment,
cross compiler version, this builder's recipe version), so a changed input rebuilds and an
unchanged one costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgevirt.errors import ImageError, SetupError
from edgevirt.paths import cache_dir, images_dir

log = logging.getLogger(__name__)

#: Bump when the build recipe changes in a way that changes the output.
RECIPE_VERSION = 1
SOURCE_PACKAGE = "linux-source-6.1"
CROSS = "aarch64-linux-gnu-"
#: Rough count of compile steps for our config; refined from the last build's log.
DEFAULT_STEPS = 1500

Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass(frozen=True)
class KernelBuild:
    key: str
    dir: Path

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


def _pkg_version(pkg: str) -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError) as e:
        raise SetupError(
            f"package {pkg} is not installed", hint=f"run `make setup` or `apt-get install {pkg}`"
        ) from e
    return out.stdout.strip()


def source_tarball() -> Path:
    matches = sorted(Path("/usr/src").glob(f"{SOURCE_PACKAGE}.tar.*"))
    if not matches:
        raise SetupError(
            f"/usr/src/{SOURCE_PACKAGE}.tar.xz not found",
            hint=f"run `make setup` or `apt-get install {SOURCE_PACKAGE}`",
        )
    return matches[0]


def default_fragment() -> Path:
    return images_dir() / "kernel.config"


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


def cache_key(fragment: Path) -> str:
    inputs = {
        "recipe": RECIPE_VERSION,
        "source": f"{SOURCE_PACKAGE}={_pkg_version(SOURCE_PACKAGE)}",
        "cross": f"gcc-aarch64-linux-gnu={_pkg_version('gcc-aarch64-linux-gnu')}",
        "fragment": hashlib.sha256(fragment.read_bytes()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _check_tools() -> None:
    missing = [t for t in (f"{CROSS}gcc", "make", "flex", "bison", "bc") if not shutil.which(t)]
    if missing:
        raise SetupError(
            f"kernel build tools missing: {', '.join(missing)}",
            hint="run `make setup` (installs gcc-aarch64-linux-gnu flex bison bc libssl-dev)",
        )


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


def _make(src: Path, args: list[str], logf, progress: Progress | None, total: int) -> int:
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


def check_config(config_text: str, wanted: dict[str, str], origin: str) -> None:
    have = parse_fragment(
        "\n".join(ln for ln in config_text.splitlines() if ln.startswith(("CONFIG_", "# CONFIG_")))
    )
    missing = [
        f"{k}={v} (got {have.get(k, 'n')})" for k, v in wanted.items() if have.get(k, "n") != v
    ]
    if missing:
        raise ImageError(
            f"{origin}: options from the fragment did not survive olddefconfig: "
            + ", ".join(missing),
            hint="an option's dependency is missing from the fragment",
        )


def build_kernel(
    fragment: Path | None = None, *, force: bool = False, progress: Progress | None = None
) -> KernelBuild:
    """Return the cached build for these inputs, building it first if needed."""
    fragment = fragment or default_fragment()
    wanted = parse_fragment(fragment.read_text(), str(fragment))
    key = cache_key(fragment)
    kb = KernelBuild(key=key, dir=cache_dir() / "kernel" / key)
    done = kb.dir / "meta.json"
    if done.exists() and kb.image.exists() and not force:
        log.info("kernel %s cached at %s", key, kb.dir)
        return kb
    _check_tools()
    tarball = source_tarball()
    kb.dir.mkdir(parents=True, exist_ok=True)
    done.unlink(missing_ok=True)
    if not (kb.source / "Makefile").exists():
        _extract(tarball, kb.source, progress)
    total = _last_steps()
    with open(kb.log, "w") as logf:
        _make(kb.source, ["allnoconfig"], logf, None, 1)
        with open(kb.source / ".config", "a") as cfg:
            cfg.write("\n# edgevirt fragment\n" + fragment.read_text())
        _make(kb.source, ["olddefconfig"], logf, None, 1)
        check_config((kb.source / ".config").read_text(), wanted, str(fragment))
        steps = _make(kb.source, ["Image", "modules_prepare"], logf, progress, total)
        rel = subprocess.run(
            ["make", "-s", "ARCH=arm64", f"CROSS_COMPILE={CROSS}", "kernelrelease"],
            cwd=kb.source,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    shutil.copy2(kb.source / "arch/arm64/boot/Image", kb.image)
    shutil.copy2(kb.source / "vmlinux", kb.vmlinux)
    shutil.copy2(kb.source / ".config", kb.config)
    (kb.dir / "release").write_text(rel + "\n")
    done.write_text(
        json.dumps({"key": key, "release": rel, "steps": steps, "tarball": tarball.name}, indent=2)
    )
    return kb
