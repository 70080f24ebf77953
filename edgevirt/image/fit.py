"""FIT images (``.itb``) for U-Boot boards: kernel + ramdisk + fdt, each with a sha256 hash.

edgevirt writes the image tree source (``.its``, U-Boot's ``doc/usage/fit/source_file_format``)
and lets ``mkimage -f`` (u-boot-tools) compile it; ``dumpimage -l`` lists the result, and
:func:`verify_fit` checks that the hashes mkimage embedded are the sha256 of our inputs.
``SOURCE_DATE_EPOCH`` pins the FIT's ``timestamp``, so the same inputs give the same bytes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevirt.devicetree.fdt import Fdt, Node
from edgevirt.errors import ConfigError, DeviceTreeError, ImageError, SetupError

log = logging.getLogger(__name__)

#: QEMU virt's U-Boot (DESIGN §3): kernel_addr_r=0x40400000.
DEFAULT_KERNEL_LOAD = 0x40400000


@dataclass(frozen=True)
class FitLayout:
    """Where U-Boot puts the kernel (``load``/``entry``), optionally the ramdisk and fdt."""

    kernel_load: int = DEFAULT_KERNEL_LOAD
    kernel_entry: int | None = None  # default: kernel_load
    ramdisk_load: int | None = None  # None: used in place
    fdt_load: int | None = None
    description: str = "edgevirt guest"

    @classmethod
    def from_table(cls, table: dict[str, Any], where: str) -> FitLayout:
        known = {"kernel_load", "kernel_entry", "ramdisk_load", "fdt_load", "description"}
        for k, v in table.items():
            if k not in known:
                raise ConfigError(f"{where}: unknown key {k!r} (known: {', '.join(sorted(known))})")
            if k == "description":
                if not isinstance(v, str):
                    raise ConfigError(f"{where}.{k}: expected a string, got {v!r}")
            elif not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 64:
                raise ConfigError(f"{where}.{k}: expected an address (0x…), got {v!r}")
        return cls(**table)


def _cells(value: int, cells: int) -> str:
    if cells == 1:
        return f"<{value:#x}>"
    return f"<{value >> 32:#x} {value & 0xFFFFFFFF:#x}>"


def _incbin(path: Path, base: Path) -> str:
    # Inputs beside the .its are named relatively: the .its is then reproducible too.
    full = path.resolve()
    p = str(full.relative_to(base)) if full.is_relative_to(base) else str(full)
    if '"' in p or "\\" in p:
        raise ImageError(f"{p}: a FIT input path may not contain quotes or backslashes")
    return f'/incbin/("{p}")'


def write_its(
    its: Path,
    *,
    kernel: Path,
    ramdisk: Path,
    fdt: Path,
    layout: FitLayout,
    release: str,
) -> None:
    addrs = [layout.kernel_load, layout.kernel_entry, layout.ramdisk_load, layout.fdt_load]
    cells = 2 if any(a is not None and a > 0xFFFFFFFF for a in addrs) else 1
    base = its.parent.resolve()
    entry = layout.kernel_entry if layout.kernel_entry is not None else layout.kernel_load

    def opt_load(addr: int | None) -> str:
        return f"\t\t\tload = {_cells(addr, cells)};\n" if addr is not None else ""

    hash_node = '\t\t\thash-1 {\n\t\t\t\talgo = "sha256";\n\t\t\t};\n'
    its.write_text(
        "/dts-v1/;\n\n/ {\n"
        f'\tdescription = "{layout.description}";\n'
        f"\t#address-cells = <{cells}>;\n\n"
        "\timages {\n"
        "\t\tkernel-1 {\n"
        f'\t\t\tdescription = "Linux {release}";\n'
        f"\t\t\tdata = {_incbin(kernel, base)};\n"
        '\t\t\ttype = "kernel";\n\t\t\tarch = "arm64";\n\t\t\tos = "linux";\n'
        '\t\t\tcompression = "none";\n'
        f"\t\t\tload = {_cells(layout.kernel_load, cells)};\n"
        f"\t\t\tentry = {_cells(entry, cells)};\n" + hash_node + "\t\t};\n"
        "\t\tramdisk-1 {\n"
        '\t\t\tdescription = "edgevirt initramfs";\n'
        f"\t\t\tdata = {_incbin(ramdisk, base)};\n"
        '\t\t\ttype = "ramdisk";\n\t\t\tarch = "arm64";\n\t\t\tos = "linux";\n'
        '\t\t\tcompression = "none";\n' + opt_load(layout.ramdisk_load) + hash_node + "\t\t};\n"
        "\t\tfdt-1 {\n"
        '\t\t\tdescription = "device tree";\n'
        f"\t\t\tdata = {_incbin(fdt, base)};\n"
        '\t\t\ttype = "flat_dt";\n\t\t\tarch = "arm64";\n'
        '\t\t\tcompression = "none";\n' + opt_load(layout.fdt_load) + hash_node + "\t\t};\n"
        "\t};\n\n"
        "\tconfigurations {\n"
        '\t\tdefault = "conf-1";\n'
        "\t\tconf-1 {\n"
        f'\t\t\tdescription = "Linux {release} with initramfs and fdt";\n'
        '\t\t\tkernel = "kernel-1";\n\t\t\tramdisk = "ramdisk-1";\n\t\t\tfdt = "fdt-1";\n'
        "\t\t};\n\t};\n};\n"
    )


def _tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise SetupError(f"{name} not found", hint="run `apt-get install u-boot-tools`")
    return path


def build_fit(
    out: Path,
    *,
    kernel: Path,
    ramdisk: Path,
    fdt: Path,
    layout: FitLayout | None = None,
    release: str = "",
    epoch: int = 0,
) -> Path:
    """Write ``out`` (and ``out.its`` beside it) with mkimage; check it with dumpimage."""
    layout = layout or FitLayout()
    for p in (kernel, ramdisk, fdt):
        if not p.is_file():
            raise ImageError(f"FIT input {p} does not exist")
    if fdt.read_bytes()[:4] != b"\xd0\x0d\xfe\xed":
        raise ImageError(f"{fdt}: not a flattened device tree (no d00dfeed magic)")
    its = out.with_suffix(".its")
    write_its(its, kernel=kernel, ramdisk=ramdisk, fdt=fdt, layout=layout, release=release)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch)}
    r = subprocess.run(
        [_tool("mkimage"), "-f", its.name, str(tmp.resolve())],
        capture_output=True,
        text=True,
        env=env,
        cwd=its.parent,
    )
    if r.returncode:
        tmp.unlink(missing_ok=True)
        raise ImageError(f"mkimage -f {its} failed (exit {r.returncode}): {r.stderr.strip()}")
    os.replace(tmp, out)
    verify_fit(out, {"kernel-1": kernel, "ramdisk-1": ramdisk, "fdt-1": fdt})
    return out


@dataclass(frozen=True)
class FitImage:
    name: str
    type: str
    size: int
    hash_algo: str
    hash: str
    load: int | None


def list_fit(itb: Path) -> tuple[str, list[FitImage]]:
    """``dumpimage -l`` parsed: the FIT description and its images."""
    r = subprocess.run([_tool("dumpimage"), "-l", str(itb)], capture_output=True, text=True)
    if r.returncode or "FIT description" not in r.stdout:
        raise ImageError(f"{itb}: not a FIT image (dumpimage -l: {r.stderr.strip() or r.stdout})")
    desc = re.search(r"FIT description:\s*(.*)", r.stdout)
    images: list[FitImage] = []
    for block in re.split(r"\n (?=Image \d+ \()", r.stdout)[1:]:
        block = block.split("\n Default Configuration")[0]
        name = re.match(r"Image \d+ \((.+?)\)", block)
        fields = dict(re.findall(r"^\s+([A-Za-z ]+):\s+(.*)$", block, re.M))
        size = re.match(r"(\d+) Bytes", fields.get("Data Size", ""))
        load = fields.get("Load Address")
        images.append(
            FitImage(
                name.group(1) if name else "?",
                fields.get("Type", "?").strip(),
                int(size.group(1)) if size else -1,
                fields.get("Hash algo", "").strip(),
                fields.get("Hash value", "").strip(),
                int(load, 16) if load and load.startswith("0x") else None,
            )
        )
    return (desc.group(1).strip() if desc else ""), images


def verify_fit(itb: Path, inputs: dict[str, Path]) -> list[FitImage]:
    """Each named image exists with the sha256 (per mkimage) of the file it came from."""
    _, images = list_fit(itb)
    by_name = {i.name: i for i in images}
    for name, src in inputs.items():
        img = by_name.get(name)
        if img is None:
            raise ImageError(f"{itb}: no image {name!r} (has {', '.join(by_name) or 'none'})")
        want = hashlib.sha256(src.read_bytes()).hexdigest()
        if img.hash_algo != "sha256" or img.hash != want:
            raise ImageError(
                f"{itb}: image {name} has {img.hash_algo or 'no'} hash {img.hash[:16]}…, "
                f"expected sha256 {want[:16]}… of {src}"
            )
    return images


# -- reading a FIT natively (for `image inspect`: every image's data and hash checked) ---------

#: FIT ``hash-N`` algorithms (U-Boot's ``common/hash.c`` names) and their digests.
HASHES: dict[str, Callable[[bytes], bytes]] = {
    "sha1": lambda d: hashlib.sha1(d).digest(),
    "sha256": lambda d: hashlib.sha256(d).digest(),
    "sha384": lambda d: hashlib.sha384(d).digest(),
    "sha512": lambda d: hashlib.sha512(d).digest(),
    "md5": lambda d: hashlib.md5(d).digest(),
    "crc32": lambda d: zlib.crc32(d).to_bytes(4, "big"),
}


@dataclass(frozen=True)
class FitContents:
    description: str
    images: list[FitImage]
    data: dict[str, bytes]  # image name -> its data
    types: dict[str, tuple[str, str, str]]  # image name -> (type, arch, compression)
    configurations: dict[str, dict[str, list[str]]]  # conf -> role -> image names
    default: str


def is_fit(fdt: Fdt) -> bool:
    return fdt.root.find_child("images") is not None and (
        fdt.root.find_child("configurations") is not None
    )


def read_fit(data: bytes, *, source: str) -> FitContents:
    """Parse a FIT in full: every image's data (embedded or external) against each of its
    ``hash-N`` nodes, and every image a configuration names. ImageError otherwise."""
    try:
        fdt = Fdt.from_bytes(data)
    except DeviceTreeError as e:
        raise ImageError(f"{source}: {e}") from e
    if not is_fit(fdt):
        raise ImageError(f"{source}: a DTB without /images and /configurations, not a FIT")
    total = int.from_bytes(data[4:8], "big")
    images_node = fdt.root.find_child("images")
    confs_node = fdt.root.find_child("configurations")
    assert images_node is not None and confs_node is not None
    images: list[FitImage] = []
    blobs: dict[str, bytes] = {}
    types: dict[str, tuple[str, str, str]] = {}
    try:
        for name, node in images_node.children.items():
            where = f"{source}: /images/{name}"
            blob = _fit_data(node, data, total, where)
            algo, value = "", ""
            for hname, hnode in node.children.items():
                if not hname.startswith("hash"):
                    continue
                algo = hnode.prop("algo").as_string() if hnode.get("algo") else ""
                if algo not in HASHES:
                    raise ImageError(f"{where}/{hname}: unknown hash algo {algo!r}")
                stored = hnode.get("value")
                want = HASHES[algo](blob)
                if stored is None or stored.value != want:
                    got = stored.value.hex() if stored is not None else "none"
                    raise ImageError(
                        f"{where}/{hname}: {algo} of the {len(blob)}-byte data is "
                        f"{want.hex()[:16]}…, the FIT stores {got[:16]}… (corrupt or truncated)"
                    )
                value = want.hex()
            if not algo:
                raise ImageError(f"{where}: no hash node: its data cannot be verified")
            load = node.get("load")
            strs = {k: node.prop(k).as_string() if node.get(k) else "" for k in
                    ("type", "arch", "compression")}  # fmt: skip
            images.append(
                FitImage(name, strs["type"], len(blob), algo, value,
                         _cells_value(load.value) if load is not None else None)
            )  # fmt: skip
            blobs[name] = blob
            types[name] = (strs["type"], strs["arch"], strs["compression"])
        configurations: dict[str, dict[str, list[str]]] = {}
        for cname, cnode in confs_node.children.items():
            roles: dict[str, list[str]] = {}
            for role in ("kernel", "ramdisk", "fdt", "loadables", "firmware"):
                if cnode.get(role) is None:
                    continue
                roles[role] = [n for n in cnode.prop(role).as_strings() if n]
                for n in roles[role]:
                    if n not in blobs:
                        raise ImageError(
                            f"{source}: /configurations/{cname}: {role} {n!r} is not in /images"
                        )
            configurations[cname] = roles
        default = confs_node.prop("default").as_string() if confs_node.get("default") else ""
        if default and default not in configurations:
            raise ImageError(f"{source}: default configuration {default!r} does not exist")
        desc = fdt.root.prop("description").as_string() if fdt.root.get("description") else ""
    except DeviceTreeError as e:
        raise ImageError(f"{source}: {e}") from e
    return FitContents(desc, images, blobs, types, configurations, default)


def _cells_value(raw: bytes) -> int | None:
    if len(raw) not in (4, 8):
        return None
    return int.from_bytes(raw, "big")


def _fit_data(node: Node, blob: bytes, total: int, where: str) -> bytes:
    """``data``, or external data at ``data-offset`` (after the FDT) / ``data-position``."""
    prop = node.get("data")
    if prop is not None:
        return prop.value
    size = node.get("data-size")
    if size is None:
        raise ImageError(f"{where}: neither data nor data-size")
    length = size.as_u32()
    if node.get("data-position") is not None:
        start = node.prop("data-position").as_u32()
    elif node.get("data-offset") is not None:
        start = ((total + 3) & ~3) + node.prop("data-offset").as_u32()
    else:
        raise ImageError(f"{where}: data-size without data-offset or data-position")
    if start + length > len(blob):
        raise ImageError(
            f"{where}: external data {start:#x}+{length:#x} runs past the end of the "
            f"{len(blob):#x}-byte file (truncated)"
        )
    return blob[start : start + length]
