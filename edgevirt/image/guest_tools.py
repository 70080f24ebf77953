"""Small guest test tools (``images/initramfs/tools/*.c``) built for the initramfs.

They are freestanding aarch64 programs (raw system calls, no libc), so the cross compiler
alone builds them: no arm64 libc headers, no package beyond ``gcc-aarch64-linux-gnu``.
Each lands in the guest as ``/bin/<name>``. Builds are cached next to the output by the
source's sha256 (a build takes well under a second anyway).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

from edgevirt.errors import ImageError, SetupError
from edgevirt.paths import images_dir

CC = "aarch64-linux-gnu-gcc"
CFLAGS = ["-static", "-nostdlib", "-ffreestanding", "-fno-builtin", "-fno-stack-protector",
          "-O2", "-Wall", "-Werror"]  # fmt: skip


def tool_sources() -> list[Path]:
    return sorted((images_dir() / "initramfs" / "tools").glob("*.c"))


def build_guest_tools(out: Path) -> dict[str, tuple[Path, int]]:
    """Compile every tool into ``out``; returns ``{"/bin/NAME": (binary, 0o755)}``."""
    sources = tool_sources()
    if not sources:
        return {}
    if shutil.which(CC) is None:
        raise SetupError(f"{CC} not found", hint="run `make setup` (gcc-aarch64-linux-gnu)")
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, tuple[Path, int]] = {}
    for src in sources:
        digest = hashlib.sha256(src.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:16]
        binary = out / f"{src.stem}-{digest}"
        if not binary.exists():
            tmp = binary.with_suffix(".tmp")
            r = subprocess.run([CC, *CFLAGS, "-o", str(tmp), str(src)],
                               capture_output=True, text=True, timeout=120)  # fmt: skip
            if r.returncode != 0:
                raise ImageError(f"guest tool {src.name} did not build: {r.stderr.strip()[-800:]}")
            tmp.rename(binary)
        files[f"/bin/{src.stem}"] = (binary, 0o755)
    return files
