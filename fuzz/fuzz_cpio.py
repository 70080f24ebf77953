"""atheris target: initramfs archives as `edgevirt image inspect` reads a user's image.

Structure-aware: the input picks entries for edgevirt's own cpio writer (files, some of them
ELF headers taken from this interpreter or a `.ko`-looking name, symlinks, directories,
devices), gzip or not, then a few byte mutations of the archive (header digits, name sizes,
file sizes). Runs ``read_cpio`` and ``inspect_path`` (``verify_initramfs``: every ELF inside,
interpreters through symlinks, modules' vermagic). Invariants: fuzz/guard.py.

    PYTHONPATH=. .venv/bin/python fuzz/fuzz_cpio.py fuzz/corpus/cpio -max_len=4096
"""

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guard import Guard  # noqa: E402

with atheris.instrument_imports(include=["edgevirt"]):
    from edgevirt.errors import EdgevirtError
    from edgevirt.image.cpio import CpioWriter, read_cpio
    from edgevirt.image.inspect import inspect_path

ELF = Path(sys.executable).resolve().read_bytes()[:4096]  # a real ELF header + some tables
NAMES = ["init", "bin/busybox", "lib/modules/x.ko", "lib", "lib/ld-linux-aarch64.so.1",
         "usr/lib", "a/b/c", "dev/console", "TRAILER!!!", "bin/sh"]  # fmt: skip
guard = Guard()


def make(data: bytes) -> bytes:
    fdp = atheris.FuzzedDataProvider(data)
    w = CpioWriter(mtime=0)
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        name = fdp.PickValueInList(NAMES)
        kind = fdp.ConsumeIntInRange(0, 4)
        try:
            if kind == 0:
                w.add_file(name, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 48)))
            elif kind == 1:
                cut = fdp.ConsumeIntInRange(0, len(ELF))
                w.add_file(name, ELF[:cut] + fdp.ConsumeBytes(16), 0o755)
            elif kind == 2:
                w.add_symlink(name, fdp.PickValueInList(NAMES + ["/lib", "..", "usr/lib"]))
            elif kind == 3:
                w.add_dir(name)
            else:
                w.add_device(name, "c", fdp.ConsumeIntInRange(0, 300), fdp.ConsumeIntInRange(0, 9))
        except EdgevirtError:
            pass  # the writer refused a combination: that is the writer's business
    blob = bytearray(w.to_bytes(compress="gzip" if fdp.ConsumeBool() else None))
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        if blob:
            blob[fdp.ConsumeIntInRange(0, len(blob) - 1)] = fdp.ConsumeIntInRange(0, 255)
    if fdp.ConsumeBool() and blob:
        del blob[fdp.ConsumeIntInRange(0, len(blob) - 1) :]
    return bytes(blob)


def check(out: Path, blob: bytes) -> None:
    try:
        read_cpio(blob, source="fuzz.cpio")
    except EdgevirtError:
        pass
    path = out / "initramfs.cpio"
    path.write_bytes(blob)
    if blob[:2] == b"\x1f\x8b" or blob[:6] == b"070701":
        inspect_path(path)


def TestOneInput(data: bytes) -> None:
    blob = make(data)
    guard.run(lambda out: check(out, blob))


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
