"""The host side of a virtio-net device: a Linux TAP, or a datagram socket pair in tests.

A *frame link* is an fd on which every read returns one frame and every write sends one,
both prefixed by the 12-byte ``virtio_net_hdr_v1`` (``IFF_VNET_HDR`` with
``TUNSETVNETHDRSZ`` 12 on a TAP), so the device can move bytes between guest buffers and
the link with ``readv``/``writev`` and no copy. The TAP may live in a network namespace
(``/run/netns/NAME``, as ``ip netns add`` makes them): the back-end enters it only for the
``TUNSETIFF`` call, the fd keeps working from the back-end's own namespace.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
from pathlib import Path

from edgevirt.errors import BackendError, ConfigError, SetupError

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16
CLONE_NEWNET = 0x40000000
#: linux/if_tun.h offload flags for TUNSETOFFLOAD (what the TAP may hand us).
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
VNET_HDR_LEN = 12

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise BackendError(f"cannot enter network namespace {what}: {os.strerror(e)}")


class FrameLink:
    """An fd carrying one vnet-header-prefixed frame per read/write."""

    kind = "link"

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name

    def set_offload(self, flags: int) -> None:
        """Which offloads the link may use towards us (none unless the guest took them)."""

    def describe(self) -> str:
        return f"{self.kind} {self.name}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Tap(FrameLink):
    kind = "tap"

    def __init__(self, name: str, netns: str | None = None) -> None:
        if not name or len(name.encode()) >= IFNAMSIZ or "/" in name:
            raise ConfigError(f"tap name {name!r}: expected 1..{IFNAMSIZ - 1} bytes, no '/'")
        self.netns = netns
        fd = self._open(name, netns)
        super().__init__(fd, name)

    def describe(self) -> str:
        return f"tap {self.name}" + (f" (netns {self.netns})" if self.netns else "")

    @staticmethod
    def _open(name: str, netns: str | None) -> int:
        own = ns = -1
        if netns is not None:
            path = Path(netns) if "/" in netns else Path("/run/netns") / netns
            try:
                ns = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                if ns >= 0:
                    os.close(ns)
                raise SetupError(
                    f"network namespace {netns}: cannot open {e.filename}: {e.strerror}",
                    hint="create it first: ip netns add NAME",
                ) from e
        fd = -1
        try:
            if ns >= 0:
                _setns(ns, netns or "")
            try:
                fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                raise SetupError(
                    f"cannot open {TUN_DEVICE}: {e.strerror}",
                    hint="the back-end needs CAP_NET_ADMIN and the tun module",
                ) from e
            ifr = struct.pack(f"{IFNAMSIZ}sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            try:
                fcntl.ioctl(fd, TUNSETIFF, ifr)
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
                fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
            except OSError as e:
                cls = SetupError if e.errno == errno.EPERM else BackendError
                raise cls(f"tap {name}: TUNSETIFF/TUNSETVNETHDRSZ: {e.strerror}",
                          hint="another process may hold it; the back-end needs "
                          "CAP_NET_ADMIN") from e  # fmt: skip
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        finally:
            if own >= 0:
                _setns(own, "of the back-end")  # back home before anything else runs
                os.close(own)
            if ns >= 0:
                os.close(ns)
        return fd

    def set_offload(self, flags: int) -> None:
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
        except OSError as e:
            raise BackendError(f"tap {self.name}: TUNSETOFFLOAD {flags:#x}: {e.strerror}") from e


class DatagramLink(FrameLink):
    """A unix datagram socket pair: the device's end is the link, ``peer`` the "wire".

    For tests and for wiring two back-ends together without a kernel network: what the peer
    sends arrives in the guest as one frame (header included), what the guest sends can be
    received from the peer.
    """

    kind = "socketpair"

    def __init__(self, name: str = "dgram") -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        a.setblocking(False)
        self._sock = a
        self.peer = b
        super().__init__(a.fileno(), name)

    def close(self) -> None:
        if self.fd >= 0:
            self._sock.close()
            self.peer.close()
            self.fd = -1
