"""The real-board path: a U-Boot boot script that loads Xen, the domUs and the host DTB.

What AMD/Xilinx ImageBuilder's ``uboot-script-gen`` does for dom0less boards, from
edgevirt's own load plan (:class:`~edgevirt.devicetree.xen.XenDt`): every module is loaded
at the address the host DTB's ``module@`` nodes name, Xen and the DTB below them, then
``booti <xen> - <dtb>``. ``mkimage -T script`` wraps it for U-Boot's ``source``. The files
go into one directory under the names the script uses, ready for a TFTP server (``-t
tftp``) or a FAT/ext4 boot partition (``load mmc 0:1``).

On QEMU the same script runs from ``u-boot-qemu``'s ``qemu_arm64`` build at EL2, over
QEMU's user-mode network TFTP (what Xen's own CI does for its dom0less smoke tests).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from edgevirt.devicetree.xen import XEN_LOAD, XenDt
from edgevirt.errors import ImageError, SetupError

#: Inside the window the load plan keeps free for Xen and the DTB (``XEN_LOAD``).
XEN_ADDR = 0x40400000
DTB_ADDR = 0x41800000
SCRIPT_ADDR = 0x40200000
LOADERS = {"tftp": "tftpb {addr:#x} {name}", "mmc": "load mmc 0:1 {addr:#x} {name}"}


@dataclass(frozen=True)
class BootScript:
    dir: Path
    cmd: Path
    scr: Path
    files: dict[str, Path]


def boot_commands(dt: XenDt, names: dict[str, str], xen_name: str, *, load: str = "tftp") -> str:
    """U-Boot commands: load Xen, the host DTB and every module, then boot Xen."""
    if load not in LOADERS:
        raise ImageError(f"boot script: load {load!r}, expected one of {', '.join(LOADERS)}")
    lo, size = XEN_LOAD
    if not (lo <= XEN_ADDR < DTB_ADDR < lo + size):
        raise ImageError(f"boot script: Xen {XEN_ADDR:#x} / DTB {DTB_ADDR:#x} outside "
                         f"[{lo:#x}, {lo + size:#x})")  # fmt: skip
    fmt = LOADERS[load]
    lines = ["# edgevirt: Xen dom0less boot (generated; addresses from the host DTB's load plan)",
             "setenv fdt_high 0xffffffffffffffff",
             fmt.format(addr=XEN_ADDR, name=xen_name),
             fmt.format(addr=DTB_ADDR, name=names["host.dtb"])]  # fmt: skip
    for ld in dt.loads:
        lines.append(f"# {ld.what}: {ld.size:#x} bytes")
        lines.append(fmt.format(addr=ld.addr, name=names[ld.what]))
    lines += [f"fdt addr {DTB_ADDR:#x}", f"booti {XEN_ADDR:#x} - {DTB_ADDR:#x}"]
    return "\n".join(lines) + "\n"


def write_boot_script(dt: XenDt, xen_image: Path, out: Path, *, load: str = "tftp") -> BootScript:
    """``out``/boot.cmd, boot.scr and every file under the name the script loads."""
    if shutil.which("mkimage") is None:
        raise SetupError("mkimage not found", hint="apt-get install u-boot-tools")
    out.mkdir(parents=True, exist_ok=True)
    names = {"host.dtb": "host.dtb"}
    files = {"xen": xen_image, "host.dtb": dt.host_dtb}
    for ld in dt.loads:
        names[ld.what] = ld.what.replace(" ", "-")
        files[names[ld.what]] = ld.path
    for name, src in files.items():
        dst = out / name
        dst.unlink(missing_ok=True)
        shutil.copyfile(src, dst)
    cmd = out / "boot.cmd"
    cmd.write_text(boot_commands(dt, names, "xen", load=load))
    scr = out / "boot.scr"
    r = subprocess.run(["mkimage", "-A", "arm64", "-O", "linux", "-T", "script", "-C", "none",
                        "-n", "edgevirt xen dom0less", "-d", str(cmd), str(scr)],
                       capture_output=True, text=True, check=False)  # fmt: skip
    if r.returncode != 0:
        raise ImageError(f"mkimage -T script {cmd} failed: {r.stderr.strip()}")
    return BootScript(out, cmd, scr, {n: out / n for n in files})
