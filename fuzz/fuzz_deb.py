"""atheris target: .deb files (ar + control/data tar, every compression) through the reader
and the one unpacking module, as a hostile mirror would hand them to ``apt-get download``.

Structure-aware: the input chooses the data.tar members (names from a vocabulary with
``..``, absolute and ``./`` forms, links whose targets climb, absolute links, hard links,
devices, FIFOs), the compression (none, gz, xz, bz2, zst) and then a few byte mutations of
the finished .deb. Invariants (fuzz/guard.py): only ``EdgevirtError`` from
``DebArchive``/``iter_data``/``control``/``unpack.extract_deb``/``unpack.read_file``; no
hang; nothing written outside the output directory; and after a successful extraction
every symbolic link under the root resolves inside it.

    PYTHONPATH=. .venv/bin/python fuzz/fuzz_deb.py fuzz/corpus/deb -max_len=4096
"""

import io
import os
import sys
import tarfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guard import Guard  # noqa: E402

with atheris.instrument_imports(include=["edgevirt"]):
    import zstandard

    from edgevirt.image import unpack
    from edgevirt.image.deb import DebArchive

NAMES = ["./usr/", "./usr/bin/", "./usr/bin/x", "usr/lib/y", "./a", "./a/b", "../escape",
         "./usr/../../etc/passwd", "/etc/passwd", "./", ".", "./usr/bin/x/z", "./lnk/f",
         "./lnk", "./dev/null", "a//b/./c"]  # fmt: skip
TARGETS = ["x", "../x", "../../../../../tmp/escape", "/etc", "/", "", "usr/../..", "./a",
           "lnk", "../usr/bin"]  # fmt: skip
KINDS = [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
         tarfile.FIFOTYPE, tarfile.BLKTYPE]  # fmt: skip
COMPRESS = ["", ".gz", ".xz", ".bz2", ".zst"]

guard = Guard()


def _tar(fdp: atheris.FuzzedDataProvider) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for _ in range(fdp.ConsumeIntInRange(0, 8)):
            pick = fdp.ConsumeBool()
            name = fdp.PickValueInList(NAMES) if pick else fdp.ConsumeUnicodeNoSurrogates(12)
            ti = tarfile.TarInfo(name or "x")
            ti.type = fdp.PickValueInList(KINDS)
            ti.mode = fdp.ConsumeIntInRange(0, 0o7777)
            data = b""
            if ti.type == tarfile.REGTYPE:
                data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
            if ti.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                pick = fdp.ConsumeBool()
                ti.linkname = (
                    fdp.PickValueInList(TARGETS) if pick else fdp.ConsumeUnicodeNoSurrogates(8)
                )
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _compress(raw: bytes, suffix: str) -> bytes:
    if suffix == ".gz":
        import gzip

        return gzip.compress(raw, mtime=0)
    if suffix == ".xz":
        import lzma

        return lzma.compress(raw)
    if suffix == ".bz2":
        import bz2

        return bz2.compress(raw)
    if suffix == ".zst":
        return zstandard.ZstdCompressor().compress(raw)
    return raw


def _ar(members: list[tuple[str, bytes]]) -> bytes:
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


def make_deb(data: bytes) -> bytes:
    fdp = atheris.FuzzedDataProvider(data)
    suffix = fdp.PickValueInList(COMPRESS)
    control = _compress(_tar_control(), ".gz")
    deb = bytearray(_ar([("debian-binary", b"2.0\n"), ("control.tar.gz", control),
                         (f"data.tar{suffix}", _compress(_tar(fdp), suffix))]))  # fmt: skip
    for _ in range(fdp.ConsumeIntInRange(0, 3)):  # then a few byte mutations
        if deb:
            deb[fdp.ConsumeIntInRange(0, len(deb) - 1)] = fdp.ConsumeIntInRange(0, 255)
    return bytes(deb)


def _tar_control() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("./control")
        body = b"Package: p\nVersion: 1\n"
        ti.size = len(body)
        tf.addfile(ti, io.BytesIO(body))
    return buf.getvalue()


def check(out: Path, blob: bytes) -> None:
    deb = out / "in.deb"
    deb.write_bytes(blob)
    d = DebArchive(deb)
    list(d.iter_data())
    d.control()
    root = out / "root"
    try:
        unpack.read_file(deb, "/usr/bin/x")
    except Exception as e:  # only edgevirt's own errors may come out (re-raised otherwise)
        if not isinstance(e, guard.allowed):
            raise
    unpack.extract_deb(deb, root)
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            if p.is_symlink():
                real = Path(os.path.realpath(p))
                assert real == root.resolve() or real.is_relative_to(root.resolve()), (p, real)


def TestOneInput(data: bytes) -> None:
    blob = make_deb(data)
    guard.run(lambda out: check(out, blob))


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
