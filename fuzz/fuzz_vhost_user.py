"""atheris target: vhost-user message parsing (header, payload, fds) through the one choke
point, protocol.parse_header + protocol.decode, and the payload decoders after it.

Only VhostUserError may come out; a decoded message must satisfy the invariants the
back-end relies on (fd counts, sizes, regions that do not wrap).

    .venv/bin/python fuzz/fuzz_vhost_user.py -runs=500000   # see fuzz/README.md
"""

import logging
import sys

import atheris

with atheris.instrument_imports():
    from edgevirt.backend.transport.vhost_user import protocol as p
    from edgevirt.backend.transport.vhost_user.inflight import InflightRegion
    from edgevirt.errors import VhostUserError


def TestOneInput(data: bytes) -> None:
    if len(data) < p.HEADER.size + 1:
        return
    nfds = data[0] % 10
    fds = list(range(100, 100 + nfds))  # numbers only: decode never touches them
    try:
        req, flags, size = p.parse_header(data[1 : 1 + p.HEADER.size])
        payload = data[1 + p.HEADER.size :][:size]
        msg = p.decode(req, flags, payload, fds)
    except VhostUserError:
        return
    assert len(msg.payload) <= p.MAX_PAYLOAD
    want = p.FD_COUNT.get(msg.request)
    assert want is None or len(msg.fds) == want
    try:
        if msg.request is p.Request.SET_MEM_TABLE:
            for r in p.mem_regions(msg):
                assert r.size > 0 and r.gpa + r.size <= 1 << 64 and r.uva + r.size <= 1 << 64
            assert len(msg.fds) == len(p.mem_regions(msg))
        elif msg.request in (p.Request.ADD_MEM_REG, p.Request.REM_MEM_REG):
            r = p.mem_reg(msg)
            assert r.size > 0 and r.gpa + r.size <= 1 << 64
        elif msg.request in (p.Request.SET_VRING_KICK, p.Request.SET_VRING_CALL):
            msg.u64()
        elif msg.request in (p.Request.GET_INFLIGHT_FD, p.Request.SET_INFLIGHT_FD):
            size_, off, nq, qs = p.inflight(msg)
            try:  # geometry is checked before any mapping: fd -1 is never reached on error
                InflightRegion(-1, size_, off, nq, qs)
            except VhostUserError:
                pass
            except OSError:
                pass  # the checks passed and mmap of fd -1 failed: fine
        elif msg.request in (p.Request.GET_CONFIG, p.Request.SET_CONFIG):
            off, n, _ = p.CONFIG_HEADER.unpack_from(msg.payload)
            assert off <= p.MAX_CONFIG and n <= p.MAX_CONFIG
    except VhostUserError:
        return


def main() -> None:
    logging.disable(logging.CRITICAL)  # broken-queue log lines are expected here
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
