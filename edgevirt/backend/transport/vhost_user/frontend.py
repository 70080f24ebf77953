"""A synthetic vhost-user front-end: what QEMU does, driven from Python.

It ships in the package so tests, benchmarks and users can exercise a back-end without a
VMM: guest memory is a memfd (shared with the back-end through SET_MEM_TABLE), the rings
are laid out by :class:`~edgevirt.backend.virtq.driver.DriverQueue`, kicks and calls are
eventfds. Only the front-end half of the protocol that a back-end needs to see is here.
"""

from __future__ import annotations

import array
import mmap
import os
import select
import socket
from dataclasses import dataclass

from edgevirt.backend.memory import GuestMemory, Region, memfd_region
from edgevirt.backend.transport.vhost_user import protocol as p
from edgevirt.backend.transport.vhost_user.protocol import Request as R
from edgevirt.backend.virtq.driver import DriverQueue
from edgevirt.errors import VhostUserError

#: Where the fake VMM pretends its mapping of guest memory lives (any non-zero value works).
FAKE_UVA = 0x7F00_0000_0000


@dataclass
class FrontendVring:
    driver: DriverQueue
    kick: int
    call: int


class VhostUserFrontend:
    def __init__(
        self, path: str, *, gpa: int = 0x5C000000, size: int = 4 << 20, timeout: float = 5.0
    ) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.fd, region = memfd_region(gpa, size, "edgevirt-frontend")
        region.uva = FAKE_UVA
        self.region: Region = region
        self.mem = GuestMemory([region])
        self.vrings: dict[int, FrontendVring] = {}
        self.protocol_features = 0

    # -- raw messages -------------------------------------------------------------------

    def send(
        self,
        request: int,
        payload: bytes = b"",
        fds: list[int] | None = None,
        flags: int = p.VERSION,
    ) -> None:
        data = p.HEADER.pack(request, flags, len(payload)) + payload
        anc = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        )
        self.sock.sendmsg([data], anc)

    def recv_reply(self, request: int) -> bytes:
        return self.recv_reply_fds(request)[0]

    def recv_reply_fds(self, request: int) -> tuple[bytes, list[int]]:
        """A reply and the fds that came with its header (GET_INFLIGHT_FD sends one)."""
        fds = array.array("i")
        hdr, anc, _, _ = self.sock.recvmsg(
            p.HEADER.size, socket.CMSG_SPACE(p.MAX_FDS * fds.itemsize)
        )
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
        if not hdr:
            raise VhostUserError("back-end closed the connection")
        hdr += self._recv_exact(p.HEADER.size - len(hdr))
        req, flags, size = p.HEADER.unpack(hdr)
        if req != request or not flags & p.FLAG_REPLY:
            for fd in fds:
                os.close(fd)
            raise VhostUserError(f"reply to {request}: got request {req} flags {flags:#x}")
        return self._recv_exact(size), list(fds)

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise VhostUserError("back-end closed the connection")
            buf += chunk
        return buf

    def call(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> bytes:
        self.send(request, payload, fds)
        return self.recv_reply(request)

    def ack(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> int:
        """Send with NEED_REPLY (REPLY_ACK negotiated); return the back-end's status (0 = ok)."""
        self.send(request, payload, fds, p.VERSION | p.FLAG_NEED_REPLY)
        return int(p.U64.unpack(self.recv_reply(request))[0])

    # -- what QEMU does at realize and at DRIVER_OK ----------------------------------------

    def negotiate(self, extra_features: int = 0) -> int:
        offered = int(p.U64.unpack(self.call(R.GET_FEATURES))[0])
        proto = int(p.U64.unpack(self.call(R.GET_PROTOCOL_FEATURES))[0])
        self.send(R.SET_PROTOCOL_FEATURES, p.U64.pack(proto))
        self.protocol_features = proto
        self.send(R.SET_OWNER)
        want = offered & (
            1 << p.F_VERSION_1
            | 1 << p.F_ACCESS_PLATFORM
            | 1 << p.F_PROTOCOL_FEATURES
            | extra_features
        )
        self.send(R.SET_FEATURES, p.U64.pack(want))
        return offered

    def get_config(self, size: int, offset: int = 0) -> bytes:
        reply = self.call(R.GET_CONFIG, p.CONFIG_HEADER.pack(offset, size, 0) + bytes(size))
        return reply[p.CONFIG_HEADER.size :]

    def set_mem_table(self) -> None:
        r = self.region
        body = p.MEM_HEADER.pack(1, 0) + p.MEM_REGION.pack(r.gpa, r.size, r.uva, 0)
        self.send(R.SET_MEM_TABLE, body, [self.fd])

    def add_mem_reg(self) -> int:
        """CONFIGURE_MEM_SLOTS style: hand over the region with ADD_MEM_REG (acked)."""
        r = self.region
        body = p.MEM_REG.pack(0) + p.MEM_REGION.pack(r.gpa, r.size, r.uva, 0)
        return self.ack(R.ADD_MEM_REG, body, [self.fd])

    def rem_mem_reg(self) -> int:
        r = self.region
        body = p.MEM_REG.pack(0) + p.MEM_REGION.pack(r.gpa, r.size, r.uva, 0)
        return self.ack(R.REM_MEM_REG, body)

    def get_inflight(self, num_queues: int, queue_size: int) -> tuple[int, int]:
        """GET_INFLIGHT_FD: (fd, mmap_size) of the region the back-end allocated."""
        self.send(R.GET_INFLIGHT_FD, p.INFLIGHT.pack(0, 0, num_queues, queue_size))
        reply, fds = self.recv_reply_fds(R.GET_INFLIGHT_FD)
        size, _off, _nq, _qs = p.INFLIGHT.unpack(reply)
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise VhostUserError(f"GET_INFLIGHT_FD reply carried {len(fds)} fds, expected 1")
        return fds[0], int(size)

    def set_inflight(self, fd: int, size: int, num_queues: int, queue_size: int) -> None:
        self.send(R.SET_INFLIGHT_FD, p.INFLIGHT.pack(size, 0, num_queues, queue_size), [fd])

    def uva(self, gpa: int) -> int:
        return self.region.uva + gpa - self.region.gpa

    def setup_vring(
        self,
        index: int,
        size: int = 64,
        *,
        base: int | None = None,
        addr_override: tuple[int, int, int] | None = None,
        driver: DriverQueue | None = None,
        vring_base: int = 0,
        event_idx: bool = False,
    ) -> FrontendVring:
        """Lay out a ring at ``base`` in guest memory (or reuse ``driver``'s, as QEMU does
        after a reconnect) and hand it to the back-end, next avail index ``vring_base``."""
        drv = driver or DriverQueue(self.mem, size, base=base, event_idx=event_idx)
        size = drv.size
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.send(R.SET_VRING_NUM, p.VRING_STATE.pack(index, size))
        self.send(R.SET_VRING_BASE, p.VRING_STATE.pack(index, vring_base))
        desc, used, avail = addr_override or (
            self.uva(drv.desc),
            self.uva(drv.used),
            self.uva(drv.avail),
        )
        self.send(R.SET_VRING_ADDR, p.VRING_ADDR.pack(index, 0, desc, used, avail, 0))
        self.send(R.SET_VRING_CALL, p.U64.pack(index), [call])
        self.send(R.SET_VRING_KICK, p.U64.pack(index), [kick])
        self.send(R.SET_VRING_ENABLE, p.VRING_STATE.pack(index, 1))
        vr = FrontendVring(drv, kick, call)
        self.vrings[index] = vr
        return vr

    def kick(self, index: int) -> None:
        os.eventfd_write(self.vrings[index].kick, 1)

    def wait_call(self, index: int, timeout: float = 5.0) -> bool:
        fd = self.vrings[index].call
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return False
        os.eventfd_read(fd)
        return True

    def get_vring_base(self, index: int) -> int:
        _, num = p.VRING_STATE.unpack(self.call(R.GET_VRING_BASE, p.VRING_STATE.pack(index, 0)))
        return int(num)

    def close_socket(self) -> None:
        """Drop the connection but keep guest memory and rings (a VMM losing its back-end)."""
        self.sock.close()
        for vr in self.vrings.values():
            os.close(vr.kick)
            os.close(vr.call)
        self.vrings.clear()

    def reconnect(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)

    def close(self) -> None:
        self.sock.close()
        for vr in self.vrings.values():
            os.close(vr.kick)
            os.close(vr.call)
        self.vrings.clear()
        buf = self.region.buf
        if isinstance(buf, mmap.mmap):
            buf.close()
        os.close(self.fd)
