"""libfdt (pylibfdt) as an oracle in a child process: libfdt segfaults on some blobs that
pass its own ``fdt_check_full`` (DESIGN §11), so it never runs inside the fuzzer.

Protocol on stdin/stdout (our own two processes): a request is ``u32 len`` + a pickled
``(op, base, overlay)``; the answer the same framing around a pickled tuple:
``("ok", tree)``, ``("reject", what)`` (check_full refused) or ``("error", code)`` (overlay
apply failed). ``tree`` is ``(memreserve, [(path, [(prop, value), ...]), ...])`` in
document order. :class:`Oracle` is the parent's end: it restarts a worker that died and
reports ``("crash", signal)`` for that input.
"""

from __future__ import annotations

import pickle
import struct
import subprocess
import sys
from typing import Any

_LEN = struct.Struct("<I")


def _tree(
    buf: bytearray,
) -> tuple[list[tuple[int, int]], list[tuple[str, list[tuple[str, bytes]]]]]:
    import libfdt

    fdt = libfdt.FdtRo(buf)
    rsv = [tuple(fdt.get_mem_rsv(i)[-2:]) for i in range(fdt.num_mem_rsv())]
    nodes = []
    off, depth = 0, 0
    while off >= 0 and depth >= 0:  # depth -1: past the root's END_NODE
        props = []
        p = fdt.first_property_offset(off, quiet=(libfdt.NOTFOUND,))
        while p >= 0:
            prop = fdt.get_property_by_offset(p)
            props.append((prop.name, bytes(prop)))
            p = fdt.next_property_offset(p, quiet=(libfdt.NOTFOUND,))
        nodes.append((fdt.get_path(off), props))
        off, depth = fdt.next_node(off, depth, quiet=(libfdt.NOTFOUND,))
    return rsv, nodes  # type: ignore[return-value]


def _serve(op: str, base: bytes, overlay: bytes) -> tuple[str, Any]:
    import _libfdt

    b = bytearray(base)
    if _libfdt.fdt_check_full(b, len(b)) != 0:
        return "reject", "base"
    if op == "parse":
        return "ok", _tree(b)
    o = bytearray(overlay)
    if _libfdt.fdt_check_full(o, len(o)) != 0:
        return "reject", "overlay"
    buf = bytearray(len(base) + 2 * len(overlay) + 65536)
    rc = _libfdt.fdt_open_into(b, buf, len(buf))
    if rc:
        return "reject", f"open_into {rc}"
    rc = _libfdt.fdt_overlay_apply(buf, o)
    if rc:
        return "error", rc
    return "ok", _tree(buf)


def main() -> None:
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    while head := inp.read(_LEN.size):
        op, base, overlay = pickle.loads(inp.read(_LEN.unpack(head)[0]))
        try:
            answer = _serve(op, base, overlay)
        except Exception as e:  # pylibfdt's own errors: the oracle has no opinion then
            answer = ("error", f"pylibfdt {type(e).__name__}: {e}")
        data = pickle.dumps(answer)
        out.write(_LEN.pack(len(data)) + data)
        out.flush()


class Oracle:
    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None

    def _start(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
        return self._proc

    def ask(self, op: str, base: bytes, overlay: bytes = b"") -> tuple[str, Any]:
        proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        data = pickle.dumps((op, base, overlay))
        try:
            proc.stdin.write(_LEN.pack(len(data)) + data)
            proc.stdin.flush()
            head = proc.stdout.read(_LEN.size)
            if len(head) == _LEN.size:
                return pickle.loads(proc.stdout.read(_LEN.unpack(head)[0]))  # type: ignore[no-any-return]
        except BrokenPipeError:
            pass
        return "crash", proc.wait()

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()


if __name__ == "__main__":
    main()
