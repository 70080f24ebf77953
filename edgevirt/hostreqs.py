"""Every host tool and file edgevirt uses: the single source of truth for setup and doctor.

Each requirement names the feature that needs it, the Debian package that provides it and a
*functional* probe (the cross compiler must link against the arm64 libc, QEMU must start the
machine with ``-nic none``), because "the command exists" is what hid the fresh-machine
failures (DESIGN §3). ``scripts/setup-host.sh`` installs exactly the packages of this table
and runs before any virtualenv exists, so this module uses the standard library only and
works as a script::

    python3 edgevirt/hostreqs.py packages demo     # the packages `make demo` needs
    python3 edgevirt/hostreqs.py packages test     # everything (`make test`)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Features in the order the doctor shows them, with what each is for.
FEATURES: dict[str, str] = {
    "core": "the package itself and its C extension",
    "kernel": "building the guest kernel and its modules",
    "image": "initramfs, FIT and device trees",
    "qemu": "QEMU virt boards and the vhost-user back-end's peers",
    "uboot": "U-Boot boards (TFTP, FIT, ymodem) and remote serial",
    "servicevm": "the aarch64 service VM (cross-compiled C fast path)",
    "boards": "real boards' boot chains: rpi3b on QEMU raspi3b, SD cards, fastboot",
    "tests": "the test suite's own oracles and clients",
}
#: What each README command needs.
TARGETS: dict[str, tuple[str, ...]] = {
    "demo": ("core", "kernel", "image", "qemu"),
    "test": tuple(FEATURES),
}

Probe = Callable[[], tuple[bool, str]]  # (ok, what was found or what went wrong)


def _run(argv: Sequence[str], timeout: float = 30) -> tuple[bool, str]:
    exe = shutil.which(argv[0])
    if exe is None:
        return False, f"{argv[0]} not on PATH"
    try:
        r = subprocess.run(
            [exe, *argv[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"{argv[0]}: {e}"
    lines = [ln.strip() for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    if r.returncode != 0:
        # A compiler's or QEMU's own error line says more than the command does.
        errors = [ln for ln in lines if "error" in ln.lower()] or lines[-1:]
        return False, f"{Path(argv[0]).name} exited {r.returncode}: " + (
            errors[0][:160] if errors else "no output"
        )
    return True, (lines or [exe])[0][:60]


def command(*argv: str) -> Probe:
    """The tool runs and exits 0 (e.g. ``--version``)."""
    return lambda: _run(argv)


def on_path(name: str) -> Probe:
    """For tools without a harmless invocation: found on PATH and executable."""

    def probe() -> tuple[bool, str]:
        exe = shutil.which(name)
        return (True, exe) if exe else (False, f"{name} not on PATH")

    return probe


def file_exists(path: str) -> Probe:
    def probe() -> tuple[bool, str]:
        return (True, path) if Path(path).is_file() else (False, f"{path} missing")

    return probe


TUN_DEVICE = "/dev/net/tun"


def tun_opens() -> tuple[bool, str]:
    """The TUN/TAP device is there and this process may open it (the net back-end's TAPs)."""
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR)
    except OSError as e:
        return False, f"{TUN_DEVICE}: {e.strerror}"
    os.close(fd)
    return True, TUN_DEVICE


def c_links(
    compiler: str, source: str, flags: Sequence[str] = (), libs: Sequence[str] = ()
) -> Probe:
    """Compile *and link* a small program: headers and the target libc must both be there
    (``libs`` go after the source, where the linker looks for them)."""

    def probe() -> tuple[bool, str]:
        with tempfile.TemporaryDirectory(prefix="ev-doctor-") as d:
            src = Path(d) / "t.c"
            src.write_text(source)
            ok, text = _run([compiler, *flags, str(src), "-o", str(Path(d) / "t"), *libs])
        return (True, f"{compiler} compiles and links") if ok else (False, text)

    return probe


_HELLO = (
    "#include <stdio.h>\n#include <stdint.h>\n"
    'int main(void) { uint64_t x = 1; return printf("%llu", (unsigned long long)x) < 0; }\n'
)


# The calls the blk engine makes: a header or library without them fails here, not in setup.
_URING = (
    "#include <liburing.h>\n"
    "int main(void) { struct io_uring r; if (io_uring_queue_init(4, &r, 0) == 0) {\n"
    "  io_uring_register_eventfd(&r, -1); io_uring_queue_exit(&r); } return 0; }\n"
)


def python_headers() -> tuple[bool, str]:
    inc = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return (True, str(inc)) if inc.is_file() else (False, f"{inc} missing")


def venv_works() -> tuple[bool, str]:
    ok, text = _run([sys.executable, "-c", "import ensurepip, venv"])
    return (True, "venv + ensurepip") if ok else (False, text)


def qemu_starts(machine: str = "virt") -> Probe:
    """QEMU starts the machine as edgevirt runs it (``-nic none``) and writes its DTB."""

    def probe() -> tuple[bool, str]:
        with tempfile.TemporaryDirectory(prefix="ev-doctor-") as d:
            dtb = Path(d) / "m.dtb"
            ok, text = _run(
                [
                    "qemu-system-aarch64",
                    "-machine",
                    f"{machine},dumpdtb={dtb}",
                    "-cpu",
                    "cortex-a57",
                    "-nographic",
                    "-nic",
                    "none",
                ]
            )
            if ok and not dtb.is_file():
                ok, text = False, "QEMU exited 0 without writing the DTB"
        return (True, f"starts -M {machine} -nic none") if ok else (False, text)

    return probe


def dpkg_arch(arch: str) -> Probe:
    def probe() -> tuple[bool, str]:
        ok, text = _run(["dpkg", "--print-foreign-architectures"])
        if ok and arch in text.split():
            return True, f"dpkg architecture {arch}"
        return False, f"dpkg has no foreign architecture {arch} (dpkg --add-architecture {arch})"

    return probe


@dataclass(frozen=True)
class Requirement:
    name: str  # the tool or file, as a user would look for it
    feature: str  # a key of FEATURES
    package: str | None  # Debian package; None for a host setting (``fix`` says what to do)
    probe: Probe
    why: str
    fix: str = ""


R = Requirement
CROSS = "aarch64-linux-gnu-"
ARM64_LIBC = "arm64 libc (cross)"

REQUIREMENTS: tuple[Requirement, ...] = (
    # core
    R("python3 venv", "core", "python3-venv", venv_works, "make creates .venv"),
    R("Python.h", "core", "python3-dev", python_headers, "builds the C ring extension"),
    R("gcc", "core", "gcc", c_links("gcc", _HELLO), "builds the C ring extension"),
    R("make", "core", "make", command("make", "--version"), "the README commands"),
    R(
        "liburing",
        "core",
        "liburing-dev",
        c_links("gcc", _URING, libs=["-luring"]),
        "blk cache=none's io_uring engine (without it: a thread pool)",
    ),
    # kernel
    R(
        "linux-source-6.1",
        "kernel",
        "linux-source-6.1",
        file_exists("/usr/src/linux-source-6.1.tar.xz"),
        "the default kernel source",
    ),
    R(
        f"{CROSS}gcc",
        "kernel",
        "gcc-aarch64-linux-gnu",
        command(f"{CROSS}gcc", "--version"),
        "cross-compiles the kernel and modules",
    ),
    R("bc", "kernel", "bc", command("bc", "--version"), "kernel build (timeconst)"),
    R("flex", "kernel", "flex", command("flex", "--version"), "kernel build (Kconfig lexer)"),
    R("bison", "kernel", "bison", command("bison", "--version"), "kernel build (Kconfig)"),
    R(
        "openssl headers",
        "kernel",
        "libssl-dev",
        file_exists("/usr/include/openssl/opensslv.h"),
        "kernel build (sign-file, certs)",
    ),
    R(
        "libelf headers",
        "kernel",
        "libelf-dev",
        file_exists("/usr/include/libelf.h"),
        "kernel build (objtool, resolve_btfids)",
    ),
    R("xz", "kernel", "xz-utils", command("xz", "--version"), "unpacks linux-source"),
    R("kmod", "kernel", "kmod", command("depmod", "--version"), "module tooling"),
    # image
    R("dtc", "image", "device-tree-compiler", command("dtc", "--version"), "DT oracle, .dts"),
    R(
        "fdtoverlay",
        "image",
        "device-tree-compiler",
        on_path("fdtoverlay"),
        "overlay oracle in checks and tests",
    ),
    R("mkimage", "image", "u-boot-tools", command("mkimage", "-V"), "FIT images, boot scripts"),
    R("dumpimage", "image", "u-boot-tools", on_path("dumpimage"), "checks FIT images"),
    R("zstd", "image", "zstd", command("zstd", "--version"), "reads zstd-compressed .debs"),
    R("cpio", "image", "cpio", command("cpio", "--version"), "initramfs oracle"),
    R(
        "dpkg arm64",
        "image",
        None,
        dpkg_arch("arm64"),
        "downloads arm64 busybox/Python .debs",
        fix="dpkg --add-architecture arm64 && apt-get update (scripts/setup-host.sh does it)",
    ),
    # qemu
    R(
        "qemu-system-aarch64",
        "qemu",
        "qemu-system-arm",
        qemu_starts("virt"),
        "runs QEMU virt guests",
    ),
    R(
        "qemu-storage-daemon",
        "qemu",
        "qemu-system-common",
        command("qemu-storage-daemon", "--version"),
        "benchmark anchor (vhost-user-blk)",
    ),
    R("qemu-img", "qemu", "qemu-utils", command("qemu-img", "--version"), "disk images"),
    # uboot
    R(
        "u-boot.bin (qemu_arm64)",
        "uboot",
        "u-boot-qemu",
        file_exists("/usr/lib/u-boot/qemu_arm64/u-boot.bin"),
        "U-Boot on QEMU virt",
    ),
    R("ser2net", "uboot", "ser2net", command("ser2net", "-v"), "RFC2217 remote serial"),
    # servicevm
    R(
        ARM64_LIBC,
        "servicevm",
        "libc6-dev-arm64-cross",
        c_links(f"{CROSS}gcc", _HELLO),
        "cross-compiles the C fast path for the service VM",
    ),
    # boards
    R(
        "u-boot.bin (rpi_3)",
        "boards",
        "u-boot-rpi:arm64",
        file_exists("/usr/lib/u-boot/rpi_3/u-boot.bin"),
        "the Raspberry Pi 3's own U-Boot, on QEMU raspi3b (rpi3b)",
    ),
    R("mkfs.fat", "boards", "dosfstools", on_path("mkfs.fat"), "SD card: FAT32 boot partition"),
    R("mcopy", "boards", "mtools", command("mcopy", "--version"), "SD card: files onto FAT"),
    R("fastboot", "boards", "fastboot", command("fastboot", "--version"), "fastboot chain"),
    # tests
    R("sfdisk", "tests", "fdisk", command("sfdisk", "--version"), "SD card partition oracle"),
    R("mkbootimg", "tests", "mkbootimg", on_path("mkbootimg"), "Android boot image oracle"),
    R("tftp (tftp-hpa)", "tests", "tftp-hpa", on_path("tftp"), "TFTP client oracle"),
    R("atftp", "tests", "atftp", on_path("atftp"), "TFTP client oracle (windowsize)"),
    R("curl", "tests", "curl", command("curl", "--version"), "TFTP client oracle (tftp://)"),
    R(
        "ip (iproute2)",
        "tests",
        "iproute2",
        command("ip", "-V"),
        "network namespaces and TAPs for the virtio-net tests and bench",
    ),
    R(
        "nsenter",
        "tests",
        "util-linux",
        command("nsenter", "--version"),
        "commands inside a test network namespace (ip -n needs / to be a mount point)",
    ),
    R(
        "/dev/net/tun",
        "tests",
        None,
        tun_opens,
        "TAP devices behind the virtio-net back-end",
        fix="modprobe tun (a container needs --device /dev/net/tun and CAP_NET_ADMIN)",
    ),
    R(
        "socat",
        "tests",
        "socat",
        command("socat", "-V"),
        "pty pairs standing in for a lab's USB-serial adapters (edgevirt.lab.fakelab)",
    ),
)


def requirement(name: str) -> Requirement:
    """The table's entry called ``name`` (KeyError for a name not in the table)."""
    for r in REQUIREMENTS:
        if r.name == name:
            return r
    raise KeyError(name)


def packages(target: str) -> list[str]:
    """Debian packages a README target needs, in table order, without repeats."""
    features = TARGETS.get(target, (target,))
    seen: dict[str, None] = {}
    for r in REQUIREMENTS:
        if r.feature in features and r.package:
            seen.setdefault(r.package)
    return list(seen)


@dataclass(frozen=True)
class Finding:
    req: Requirement
    ok: bool
    detail: str


def check(features: Sequence[str] | None = None) -> list[Finding]:
    """Run every probe of ``features`` (all when None); a probe that raises is a failure."""
    out = []
    for r in REQUIREMENTS:
        if features and r.feature not in features:
            continue
        try:
            ok, detail = r.probe()
        except Exception as e:  # a probe must never take the doctor down with it
            ok, detail = False, f"probe failed: {e!r}"
        out.append(Finding(r, ok, detail))
    return out


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "packages" and (argv[1] in TARGETS or argv[1] in FEATURES):
        print("\n".join(packages(argv[1])))
        return 0
    print(f"usage: {os.path.basename(__file__)} packages {{{'|'.join(TARGETS)}}}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
