"""virtio-net (virtio spec 5.1) bridged to a TAP (or any :class:`~.tap.FrameLink`).

Queues: 0 receiveq (device → driver), 1 transmitq. No control queue, one queue pair.

Features: ``MAC`` (config ``mac``), ``STATUS`` (config ``status``: LINK_UP while the link
works), ``MRG_RXBUF`` (a frame may span several receive buffers; ``num_buffers`` says how
many), and, unless ``offload=off``, the checksum and TCP segmentation offloads a TAP
carries in the same header: ``CSUM``, ``GUEST_CSUM``, ``HOST_TSO4/6``, ``GUEST_TSO4/6``.
What the guest acks is passed to the TAP (TUNSETOFFLOAD), so frames towards the guest are
only ever as large or as partially checksummed as it agreed to. **Off**, and why: ``UFO``
and ``USO`` (Linux 6.1's virtio-net does not use them; UDP is segmented by the guest),
``*_ECN`` (TCP ECN is off by default in Linux; an ECN-marked TSO frame is segmented by the
guest instead), ``CTRL_VQ`` and its ``CTRL_RX``/``MQ``/``GUEST_ANNOUNCE`` (one queue pair,
no filtering: the TAP gets everything), ``MTU`` (the guest may raise its MTU; frames are
bounded by :data:`MAX_FRAME` anyway), ``HASH_REPORT``/``RSS``.

Zero copy both ways: transmit ``writev``s the chain's readable buffers (header + frame)
straight into the TAP; receive ``readv``s one frame from the TAP straight into the buffers
of deferred receive chains (the device interface's deferred completion) and then writes
``num_buffers``. The TAP is only watched while receive buffers wait, so a guest that never
refills its receive queue leaves frames in the TAP's own bounded queue (the kernel drops
and counts them there); the back-end buffers nothing.

Hostile driver rules (a bad chain costs that frame, never the queue or the process): a
transmit chain shorter than the header, longer than the largest Ethernet frame, with
device-writable buffers, or with a header asking for an offload that was not negotiated
or pointing outside the frame is dropped and counted; a receive chain with device-readable
buffers or too small for the header is answered with length 0 and counted. A TAP that
disappears marks the link down (logged once, frames dropped and counted); the device keeps
answering the guest.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import struct
from collections import deque

from edgevirt.backend.devices.base import DEFERRED, Chain, VirtioDevice, gather, views
from edgevirt.backend.devices.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, VNET_HDR_LEN, FrameLink
from edgevirt.backend.memory import GuestMemory
from edgevirt.errors import BackendError, ConfigError

log = logging.getLogger(__name__)

RX, TX = 0, 1
F_CSUM = 0
F_GUEST_CSUM = 1
F_GUEST_TSO4 = 7
F_GUEST_TSO6 = 8
F_HOST_TSO4 = 11
F_HOST_TSO6 = 12
F_MAC = 5
F_MRG_RXBUF = 15
F_STATUS = 16
S_LINK_UP = 1
#: struct virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
#: num_buffers.
HDR = struct.Struct("<BBHHHHH")
assert HDR.size == VNET_HDR_LEN
#: struct virtio_net_config up to max_virtqueue_pairs: mac, status, max_virtqueue_pairs.
CONFIG = struct.Struct("<6sHH")
#: Largest frame without offloads: Linux's ETH_MAX_MTU plus an Ethernet + VLAN header (the
#: guest may raise its MTU since we offer no VIRTIO_NET_F_MTU).
MAX_FRAME = 65535 + 18
#: What one receive must be able to hold, as the device assumes when it picks buffers:
#: a full-size Ethernet frame, or a 64 KiB segment once the guest takes TSO.
RX_NEED = VNET_HDR_LEN + 1514 + 4
RX_NEED_GSO = VNET_HDR_LEN + MAX_FRAME
OFFLOADS = (1 << F_CSUM | 1 << F_GUEST_CSUM | 1 << F_GUEST_TSO4 | 1 << F_GUEST_TSO6
            | 1 << F_HOST_TSO4 | 1 << F_HOST_TSO6)  # fmt: skip
HDR_F_NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_TCPV6 = 0, 1, 4
#: gso_type → the feature that allows the guest to send it.
GSO_FEATURE = {GSO_TCPV4: F_HOST_TSO4, GSO_TCPV6: F_HOST_TSO6}
#: guest feature → TUNSETOFFLOAD flag (what the TAP may hand us for this guest).
TUN_OFFLOAD = {F_GUEST_CSUM: TUN_F_CSUM, F_GUEST_TSO4: TUN_F_TSO4, F_GUEST_TSO6: TUN_F_TSO6}
#: Frames moved per TAP wake-up before other fds get a turn.
RX_BURST = 64
MAC_RE = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")


def parse_mac(text: str) -> bytes:
    if not MAC_RE.match(text):
        raise ConfigError(f"mac={text!r}: expected six hex bytes like 52:54:00:12:34:56")
    mac = bytes(int(b, 16) for b in text.split(":"))
    if mac[0] & 1:
        raise ConfigError(f"mac={text}: a multicast address cannot be a NIC's address")
    return mac


def scatter(bufs: list[memoryview], offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` into the concatenation of ``bufs``."""
    pos = 0
    for b in bufs:
        lo = max(offset, pos)
        hi = min(offset + len(data), pos + len(b))
        if lo < hi:
            b[lo - pos : hi - pos] = data[lo - offset : hi - offset]
        pos += len(b)


class NetDevice(VirtioDevice):
    name = "net"
    device_id = 1
    num_queues = 2

    def __init__(
        self,
        link: FrameLink,
        mac: bytes = b"\x52\x54\x00\x12\x34\x56",
        offload: bool = True,
    ) -> None:
        self.link = link
        super().__init__()
        self.mac = mac
        self.features = 1 << F_MAC | 1 << F_STATUS | 1 << F_MRG_RXBUF
        if offload:
            self.features |= OFFLOADS
        self.rx: deque[Chain] = deque()
        self._watching = False
        self.link_up = True

    # -- configuration --------------------------------------------------------------------

    def config(self) -> bytes:
        return CONFIG.pack(self.mac, S_LINK_UP if self.link_up else 0, 1)

    @property
    def acked_features(self) -> int:
        return self._acked

    @acked_features.setter
    def acked_features(self, value: int) -> None:
        """The transport sets what the driver accepted: tell the TAP which offloads the
        guest can take, so it never hands us a frame the guest did not agree to."""
        self._acked = value
        flags = 0
        for feature, tun_flag in TUN_OFFLOAD.items():
            if value >> feature & 1:
                flags |= tun_flag
        if not value >> F_GUEST_CSUM & 1:
            flags = 0  # TSO without checksum offload is not a thing the TAP does
        try:
            if self.link.fd >= 0:
                self.link.set_offload(flags)
        except BackendError as e:
            log.error("net: %s", e)

    @property
    def mergeable(self) -> bool:
        return bool(self.acked_features >> F_MRG_RXBUF & 1)

    @property
    def rx_need(self) -> int:
        gso = self.acked_features & (1 << F_GUEST_TSO4 | 1 << F_GUEST_TSO6)
        return RX_NEED_GSO if gso else RX_NEED

    def queue_stopped(self, queue: int) -> None:
        if queue == RX:
            self.rx.clear()
            self._watch(False)

    def close(self) -> None:
        self._watch(False)
        self.rx.clear()
        self.link.close()

    def snapshot(self) -> dict:
        return {
            "link": self.link.describe(),
            "link_up": self.link_up,
            "rx_buffers_waiting": len(self.rx),
        }

    def _drop(self, why: str) -> None:
        self.stats.errors += 1
        self.stats.count(why)

    def _watch(self, on: bool) -> None:
        if on == self._watching or self.host is None or self.link.fd < 0:
            return
        if on:
            self.host.add_reader(self.link.fd, self._link_readable)
        else:
            self.host.remove_reader(self.link.fd)
        self._watching = on

    def _link_gone(self, e: OSError) -> None:
        if self.link_up:
            log.error("net: %s failed (%s): link down, frames dropped from now on",
                      self.link.describe(), e.strerror or e)  # fmt: skip
        self.link_up = False
        self._watch(False)

    # -- chains ---------------------------------------------------------------------------

    def handle(self, queue: int, chain: Chain, mem: GuestMemory) -> int:
        if queue == TX:
            self._transmit(chain, mem)
            return 0
        if queue != RX:
            raise BackendError(f"net: chain {chain.head} on queue {queue}, device has 2")
        if chain.readable or chain.writable_len < VNET_HDR_LEN:
            log.warning("net: receive chain %d: %d readable / %d writable bytes, expected "
                        "only writable and at least %d", chain.head, chain.readable_len,
                        chain.writable_len, VNET_HDR_LEN)  # fmt: skip
            self._drop("rx_bad_chain")
            return 0
        self.rx.append(chain)
        if self.link_up:
            self._watch(True)
        return DEFERRED

    def _transmit(self, chain: Chain, mem: GuestMemory) -> None:
        self.stats.requests += 1
        total = chain.readable_len
        if chain.writable or total < VNET_HDR_LEN or total > VNET_HDR_LEN + MAX_FRAME:
            log.warning("net: transmit chain %d: %d readable / %d writable bytes, expected "
                        "only readable, %d..%d", chain.head, total, chain.writable_len,
                        VNET_HDR_LEN, VNET_HDR_LEN + MAX_FRAME)  # fmt: skip
            self._drop("tx_bad_chain")
            return
        hdr = HDR.unpack(gather(mem, chain.readable, VNET_HDR_LEN))
        why = self._bad_header(hdr, total - VNET_HDR_LEN)
        if why:
            log.warning("net: transmit chain %d: header %s: %s", chain.head, hdr, why)
            self._drop("tx_bad_header")
            return
        if not self.link_up:
            self._drop("tx_link_down")
            return
        try:
            os.writev(self.link.fd, views(mem, chain.readable))
        except BlockingIOError:
            self._drop("tx_link_busy")
            return
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EMSGSIZE):
                self._drop("tx_refused_by_link")
                return
            self._link_gone(e)
            self._drop("tx_link_down")
            return
        self.stats.count("tx_frames")
        self.stats.bytes_read += total - VNET_HDR_LEN

    def _bad_header(self, hdr: tuple[int, ...], frame: int) -> str | None:
        """Why a transmit header cannot go to the TAP (None: it can)."""
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, _ = hdr
        acked = self.acked_features
        if flags & ~HDR_F_NEEDS_CSUM:
            return f"flags {flags:#x}: only NEEDS_CSUM (1) is defined for transmit"
        if flags & HDR_F_NEEDS_CSUM:
            if not acked >> F_CSUM & 1:
                return "NEEDS_CSUM, but VIRTIO_NET_F_CSUM was not negotiated"
            if csum_start + csum_offset + 2 > frame:
                return f"checksum at {csum_start}+{csum_offset} beyond the {frame}-byte frame"
        if gso_type == GSO_NONE:
            return None
        feature = GSO_FEATURE.get(gso_type)
        if feature is None or not acked >> feature & 1:
            return f"gso_type {gso_type:#x} was not negotiated"
        if not flags & HDR_F_NEEDS_CSUM or gso_size == 0 or hdr_len > frame:
            return f"TSO needs NEEDS_CSUM, gso_size > 0 and hdr_len <= {frame}"
        return None

    def _link_readable(self) -> None:
        host = self.host
        if host is None:
            return
        mem = host.mem
        done: list[tuple[Chain, int]] = []
        try:
            for _ in range(RX_BURST):
                if not self.rx:
                    break
                if not self._receive_one(mem, done):
                    break
        except BackendError as e:  # a buffer outside guest memory: the queue is broken
            log.error("net: receive buffer: %s", e)
            self._drop("rx_bad_buffer")
        finally:
            if done:
                host.complete(RX, done)
        if not self.rx:
            self._watch(False)

    def _receive_one(self, mem: GuestMemory, done: list[tuple[Chain, int]]) -> bool:
        """One frame from the link into one or more deferred chains; False if none waits."""
        picked: list[Chain] = []
        caps: list[int] = []
        bufs: list[memoryview] = []
        room = 0
        need = self.rx_need
        while self.rx and (not picked or (self.mergeable and room < need)):
            chain = self.rx.popleft()
            vs = views(mem, chain.writable)
            picked.append(chain)
            caps.append(sum(len(v) for v in vs))
            bufs += vs
            room += caps[-1]
        try:
            n = os.readv(self.link.fd, bufs)
        except BlockingIOError:
            self.rx.extendleft(reversed(picked))
            return False
        except OSError as e:
            self.rx.extendleft(reversed(picked))
            self._link_gone(e)
            return False
        used, left = [], n
        for cap in caps:
            if left <= 0:
                break
            used.append(min(cap, left))
            left -= used[-1]
        if n < VNET_HDR_LEN:  # a link that hands us less than a header: give it back empty
            used = [0]
        self.rx.extendleft(reversed(picked[len(used) :]))
        if n >= room and room < need:
            self.stats.count("rx_maybe_truncated")
        scatter(bufs, 10, struct.pack("<H", len(used)))  # num_buffers
        done += [(c, u) for c, u in zip(picked, used, strict=False)]
        self.stats.requests += 1
        self.stats.count("rx_frames")
        self.stats.bytes_written += max(0, n - VNET_HDR_LEN)
        return True
