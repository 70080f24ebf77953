"""atheris target: what a TFTP client (a board's U-Boot, or anyone on the lab network) sends
to edgevirt's read-only server: requests (RRQ/WRQ with file name, mode and RFC 2347
options) and, during a transfer, ACK/ERROR packets.

Structure-aware: the request is built from the input (opcodes, names with ``..``, absolute
and backslash forms, a symlink in the served root that points out of it, options with odd
values), then a few bytes are mutated. Runs ``parse_request``, ``resolve`` against a real
served directory, ``negotiate``, ``error_packet`` and the transfer's ``_ack_or_error`` /
``_unwrap``. Invariants: fuzz/guard.py (allowed: the server's own ``Refused`` and
``_ClientError``, which become ERROR packets), and a resolved path is a regular file inside
the served root.

    PYTHONPATH=. .venv/bin/python fuzz/fuzz_tftp.py fuzz/corpus/tftp -max_len=600
"""

import struct
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guard import Guard  # noqa: E402

with atheris.instrument_imports(include=["edgevirt"]):
    from edgevirt.deploy import tftp
    from edgevirt.errors import EdgevirtError

NAMES = [b"Image", b"sub/boot.scr", b"../etc/passwd", b"/etc/passwd", b"out", b"sub\\..\\..\\x",
         b"./Image", b"", b"sub", b"loop", b"sub/../Image"]  # fmt: skip
OPTIONS = [b"blksize", b"tsize", b"timeout", b"windowsize", b"BLKSIZE", b"x"]
guard = Guard(allowed=(EdgevirtError, tftp.Refused, tftp._ClientError))
_root = Path(guard.jail) / "served"  # beside out/: a file outside it is one link away
_root.mkdir()
(_root / "Image").write_bytes(b"kernel")
(_root / "sub").mkdir()
(_root / "sub/boot.scr").write_bytes(b"script")
(_root / "out").symlink_to("/etc/hostname")
(_root / "loop").symlink_to("loop")
guard.jail_extra = {"served"}


def make(data: bytes) -> tuple[bytes, bytes]:
    fdp = atheris.FuzzedDataProvider(data)
    op = fdp.PickValueInList([1, 1, 1, 2, 3, 4, 5, 6, 0, 0xFFFF])
    name = fdp.PickValueInList(NAMES) if fdp.ConsumeBool() else fdp.ConsumeBytes(12)
    mode = fdp.PickValueInList([b"octet", b"netascii", b"OCTET", b"mail", b""])
    opts = b""
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        value = fdp.PickValueInList([b"512", b"65464", b"0", b"-1", b"1" * 30, b"x", b""])
        opts += fdp.PickValueInList(OPTIONS) + b"\0" + value + b"\0"
    packet = bytearray(struct.pack("!H", op) + name + b"\0" + mode + b"\0" + opts)
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        packet[fdp.ConsumeIntInRange(0, len(packet) - 1)] = fdp.ConsumeIntInRange(0, 255)
    return bytes(packet), fdp.ConsumeBytes(8)


def check(packet: bytes, ack: bytes) -> None:
    try:
        op, arg = tftp._ack_or_error(ack)
        if op:
            tftp._unwrap(arg, 0, 8)
            tftp._unwrap(arg, 65530, 64)
    except (tftp.Refused, tftp._ClientError):
        pass
    op, name, mode, options = tftp.parse_request(packet)
    accepted = tftp.negotiate(options, 6)
    for k, v in accepted.items():
        assert k in ("blksize", "timeout", "tsize", "windowsize") and v.isdigit(), (k, v)
    tftp.error_packet(tftp.ERR_ACCESS, f"{name!r}: refused")
    path = tftp.resolve(_root.resolve(), name)
    assert path.is_file() and path.is_relative_to(_root.resolve()), path


def TestOneInput(data: bytes) -> None:
    packet, ack = make(data)
    guard.run(lambda out: check(packet, ack))


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
