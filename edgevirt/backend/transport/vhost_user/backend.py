"""vhost-user back-end: one listening unix socket, one front-end (QEMU) at a time.

The front-end is the only peer; everything it sends is checked by :mod:`.protocol` before
it changes state. Guest memory is whatever SET_MEM_TABLE hands over, which with edgevirt's
memory topology is the carve-out alone; a ring outside it is refused with its address and
the carve-out bounds, the device is marked broken, and the process keeps serving.
"""

from __future__ import annotations

import array
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from edgevirt.backend.devices.base import Chain, VirtioDevice
from edgevirt.backend.devices.blk import BlockDevice
from edgevirt.backend.loop import Loop
from edgevirt.backend.memory import GuestMemory, Region
from edgevirt.backend.transport.vhost_user import inflight as infl
from edgevirt.backend.transport.vhost_user import protocol as p
from edgevirt.backend.transport.vhost_user.protocol import ProtocolFeature as PF
from edgevirt.backend.transport.vhost_user.protocol import Request as R
from edgevirt.backend.transport.vhost_user.vring import Vring
from edgevirt.backend.virtq import BlkAio
from edgevirt.errors import BackendError, VhostUserError

log = logging.getLogger(__name__)

#: A message's payload must follow its header within this many seconds.
PAYLOAD_TIMEOUT = 5.0
#: virtio device status DEVICE_NEEDS_RESET: GET_STATUS reports it once a vring broke.
STATUS_NEEDS_RESET = 0x40


def fastpath_enabled() -> bool:
    """``EDGEVIRT_BLK_FASTPATH=0`` (or off/false/no) forces blk onto the Python path."""
    return os.environ.get("EDGEVIRT_BLK_FASTPATH", "1").lower() not in ("0", "off", "false", "no")


@dataclass
class BackendStats:
    connections: int = 0
    messages: int = 0
    protocol_errors: int = 0
    mapped_bytes: int = 0
    refused: int = 0
    unsealed_regions: int = 0  # mapped files the front-end could still shrink (memory.py)
    vanished_pages: int = 0  # pages of such files that did shrink away (of closed tables)
    broken: list[str] = field(default_factory=list)


def _check_eventfd(fd: int, what: str) -> None:
    """Kick, call and err fds must be eventfds (vhost-user spec): a regular file cannot be
    polled (epoll refuses it: the loop would fail), and a pipe's write end would block the
    back-end once full."""
    try:
        kind = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        raise VhostUserError(f"{what}: cannot inspect the fd: {e.strerror}") from e
    if kind != "anon_inode:[eventfd]":
        raise VhostUserError(f"{what}: the fd is {kind!r}, expected an eventfd")


class VhostUserBackend:
    """Serve ``device`` on the unix socket at ``path`` (QEMU connects as the front-end)."""

    def __init__(
        self, device: VirtioDevice, path: str, loop: Loop, *, fastpath: bool | None = None
    ) -> None:
        self.device = device
        #: Serve file-backed blk with the C request path (``SplitQueue.serve_blk``);
        #: default on, ``EDGEVIRT_BLK_FASTPATH=0`` forces the Python path.
        self.fastpath = fastpath_enabled() if fastpath is None else fastpath
        self.path = path
        self.loop = loop
        self.stats = BackendStats()
        self.mem = GuestMemory()
        self.conn: socket.socket | None = None
        self.backend_req: int = -1
        self.features = 0
        self.protocol_features = 0
        self.status = 0
        self.inflight: infl.InflightRegion | None = None
        self._reply_fds: list[int] = []
        self.vrings = [Vring(i) for i in range(device.num_queues)]
        try:
            if os.path.exists(path):
                os.unlink(path)
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(path)
            self.listener.listen(1)
        except OSError as e:
            raise BackendError(
                f"{device.name}: cannot listen on {path}: {e.strerror or e}",
                hint="check that the socket directory exists and is writable",
            ) from e
        self.listener.setblocking(False)
        loop.add_reader(self.listener.fileno(), self._accept)
        device.attach(self)

    # -- the device's host (DeviceHost: devices/base.py) -------------------------------

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.loop.add_reader(fd, callback)

    def remove_reader(self, fd: int) -> None:
        self.loop.remove_reader(fd)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        self.loop.add_writer(fd, callback)

    def remove_writer(self, fd: int) -> None:
        self.loop.remove_writer(fd)

    def every(self, seconds: float, callback: Callable[[], None]) -> None:
        self.loop.every(seconds, callback)

    def complete(self, queue: int, done: Sequence[tuple[Chain, int]]) -> None:
        """Publish chains the device deferred; a guest fault breaks that vring only."""
        if not 0 <= queue < len(self.vrings):
            raise BackendError(f"{self.device.name}: complete() on queue {queue}, "
                               f"device has {len(self.vrings)}")  # fmt: skip
        vr = self.vrings[queue]
        try:
            vr.complete(self.mem, done)
        except BackendError as e:
            self._break(vr, f"vring {vr.index}: {e}")
        except OSError as e:
            log.error("%s: vring %d: %s", self.device.name, vr.index, e)

    # -- features -------------------------------------------------------------------------

    @property
    def offered_features(self) -> int:
        return (
            self.device.features
            | 1 << p.F_VERSION_1
            | 1 << p.F_ACCESS_PLATFORM  # QEMU masks the guest's view with ours: needed for the pool
            | 1 << p.F_PROTOCOL_FEATURES
            | 1 << p.F_INDIRECT_DESC
            | 1 << p.F_EVENT_IDX
        )

    @property
    def offered_protocol_features(self) -> int:
        bits = (
            1 << PF.MQ
            | 1 << PF.REPLY_ACK
            | 1 << PF.BACKEND_REQ
            | 1 << PF.INFLIGHT_SHMFD
            | 1 << PF.CONFIGURE_MEM_SLOTS
            | 1 << PF.STATUS
        )
        # QEMU requires REPLY_ACK + BACKEND_REQ once ACCESS_PLATFORM is offered.
        if self.device.config():
            bits |= 1 << PF.CONFIG
        return bits

    # -- connection -----------------------------------------------------------------------

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        if self.conn is not None:
            log.warning("%s: second front-end connection refused", self.device.name)
            conn.close()
            return
        conn.setblocking(True)
        self.conn = conn
        self.stats.connections += 1
        log.info("%s: front-end connected on %s", self.device.name, self.path)
        self.loop.add_reader(conn.fileno(), self._readable)

    def disconnect(self) -> None:
        if self.conn is None:
            return
        log.info("%s: front-end disconnected", self.device.name)
        self.loop.remove_reader(self.conn.fileno())
        self.conn.close()
        self.conn = None
        self._reset()

    def _reset(self) -> None:
        for vr in self.vrings:
            self._stop_ring(vr)
            vr.close_fds()
            vr.num, vr.addr, vr.base, vr.enabled = 0, None, 0, False
            vr.broken, vr.inflight = None, None
        if self.backend_req >= 0:
            os.close(self.backend_req)
            self.backend_req = -1
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None
        self.stats.refused += self.mem.refused
        self.stats.vanished_pages += self.mem.vanished_pages
        self.mem.close()
        self.mem = GuestMemory()
        self.features = self.protocol_features = self.status = 0
        self.device.reset()

    def close(self) -> None:
        self.disconnect()
        self.loop.remove_reader(self.listener.fileno())
        self.listener.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass
        self.device.close()

    def _recv(self) -> p.Message | None:
        assert self.conn is not None
        fds = array.array("i")
        try:
            data, anc, mflags, _ = self.conn.recvmsg(
                p.HEADER.size, socket.CMSG_SPACE(p.MAX_FDS * fds.itemsize), socket.MSG_CMSG_CLOEXEC
            )
        except ConnectionError:
            return None
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
        fdlist = list(fds)
        try:
            if not data:
                return None
            if mflags & socket.MSG_CTRUNC:
                raise VhostUserError(f"more than {p.MAX_FDS} fds attached to one message")
            req, flags, size = p.parse_header(data)
            payload = b""
            self.conn.settimeout(PAYLOAD_TIMEOUT)
            try:
                while len(payload) < size:
                    chunk = self.conn.recv(size - len(payload))
                    if not chunk:
                        raise VhostUserError(
                            f"request {req}: peer closed after {len(payload)} of {size} "
                            "payload bytes"
                        )
                    payload += chunk
            except TimeoutError:
                raise VhostUserError(
                    f"request {req}: only {len(payload)} of {size} payload bytes arrived "
                    f"within {PAYLOAD_TIMEOUT}s"
                ) from None
            finally:
                self.conn.settimeout(None)
            msg = p.decode(req, flags, payload, fdlist)
            fdlist = []  # ownership moved to msg
            return msg
        finally:
            for fd in fdlist:
                os.close(fd)

    def _send(self, request: R, payload: bytes, fds: list[int] | None = None) -> None:
        assert self.conn is not None
        data = p.pack(request, payload)
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            sent = self.conn.sendmsg([data], anc)
            if sent < len(data):
                self.conn.sendall(data[sent:])
        else:
            self.conn.sendall(data)

    def _readable(self) -> None:
        try:
            msg = self._recv()
        except VhostUserError as e:
            self.stats.protocol_errors += 1
            log.error("%s: protocol error, dropping front-end: %s", self.device.name, e)
            self.disconnect()
            return
        except OSError as e:
            log.error("%s: socket error: %s", self.device.name, e)
            self.disconnect()
            return
        if msg is None:
            self.disconnect()
            return
        self.stats.messages += 1
        ok = True
        try:
            reply = self._dispatch(msg)
        except (VhostUserError, BackendError) as e:
            self.stats.protocol_errors += 1
            log.error("%s: %s refused: %s", self.device.name, msg.request.name, e)
            reply, ok = None, False
        finally:
            for fd in msg.fds:  # handlers dup() what they keep
                os.close(fd)
        try:
            if reply is not None:
                self._send(msg.request, reply, self._reply_fds)
            elif msg.need_reply and self.protocol_features >> PF.REPLY_ACK & 1:
                self._send(msg.request, p.U64.pack(0 if ok else 1))
        except OSError:
            self.disconnect()
        finally:
            for fd in self._reply_fds:  # the peer has its own copy now
                os.close(fd)
            self._reply_fds = []

    # -- requests -------------------------------------------------------------------------

    def _vring(self, index: int) -> Vring:
        if index >= len(self.vrings):
            raise VhostUserError(
                f"vring index {index} out of range (device has {len(self.vrings)})"
            )
        return self.vrings[index]

    def _dispatch(self, msg: p.Message) -> bytes | None:  # noqa: C901 - one branch per request
        r = msg.request
        if r is R.GET_FEATURES:
            return p.U64.pack(self.offered_features)
        if r is R.SET_FEATURES:
            want = msg.u64()
            extra = want & ~self.offered_features
            if extra:
                raise VhostUserError(f"SET_FEATURES {want:#x} has bits {extra:#x} we never offered")
            self.features = want
            self.device.acked_features = want
            if not want >> p.F_PROTOCOL_FEATURES & 1:
                for vr in self.vrings:  # without protocol features rings start enabled
                    vr.enabled = True
            return None
        if r is R.GET_PROTOCOL_FEATURES:
            return p.U64.pack(self.offered_protocol_features)
        if r is R.SET_PROTOCOL_FEATURES:
            want = msg.u64()
            if want & ~self.offered_protocol_features:
                raise VhostUserError(f"SET_PROTOCOL_FEATURES {want:#x} beyond offered")
            self.protocol_features = want
            return None
        if r is R.GET_QUEUE_NUM:
            return p.U64.pack(len(self.vrings))
        if r is R.SET_OWNER:
            return None
        if r in (R.RESET_OWNER, R.RESET_DEVICE):
            self._reset()
            return None
        if r is R.SET_BACKEND_REQ_FD:
            if self.backend_req >= 0:
                os.close(self.backend_req)
            self.backend_req = os.dup(msg.fds[0])
            return None
        if r is R.SET_MEM_TABLE:
            self._set_mem_table(p.mem_regions(msg), msg.fds)
            return None
        if r is R.SET_VRING_NUM:
            idx, num = msg.state()
            vr = self._vring(idx)
            if num == 0 or num > 32768 or num & (num - 1):
                raise VhostUserError(
                    f"SET_VRING_NUM {idx}: size {num} is not a power of two <= 32768"
                )
            vr.num = num
            return None
        if r is R.SET_VRING_BASE:
            idx, base = msg.state()
            if base > 0xFFFF:
                raise VhostUserError(f"SET_VRING_BASE {idx}: base {base} exceeds 16 bits")
            self._vring(idx).base = base
            return None
        if r is R.SET_VRING_ADDR:
            idx, _flags, desc, used, avail, _log = p.VRING_ADDR.unpack(msg.payload)
            vr = self._vring(idx)
            vr.addr = (desc, used, avail)
            self._try_start(vr)
            return None
        if r in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
            v = msg.u64()
            vr = self._vring(v & p.VRING_IDX_MASK)
            name = {R.SET_VRING_KICK: "kick", R.SET_VRING_CALL: "call", R.SET_VRING_ERR: "err"}[r]
            if msg.fds:
                _check_eventfd(msg.fds[0], f"{r.name} {v & p.VRING_IDX_MASK}")
            paused = name != "err" and self._pause(vr)  # the engine thread uses kick and call
            old = getattr(vr, name)
            if name == "kick" and old >= 0:
                self.loop.remove_reader(old)
            if old >= 0:
                os.close(old)
            setattr(vr, name, os.dup(msg.fds[0]) if msg.fds else -1)
            if name == "kick" and vr.queue is not None:
                # a running ring keeps running: listen on the new kick fd from now on (an
                # engine thread gets it when _serve below hands the ring back)
                if vr.kick >= 0 and vr.aio is None:
                    self.loop.add_reader(vr.kick, lambda: self._kicked(vr))
            elif name == "kick":
                self._try_start(vr)
            if paused and vr.enabled:
                self._serve(vr)
            return None
        if r is R.GET_VRING_BASE:
            idx, _ = msg.state()
            vr = self._vring(idx)
            self._stop_ring(vr)
            return p.VRING_STATE.pack(idx, vr.base)
        if r is R.SET_VRING_ENABLE:
            idx, on = msg.state()
            vr = self._vring(idx)
            vr.enabled = bool(on)
            if vr.enabled and vr.queue is not None:
                self._serve(vr)
            elif not vr.enabled:
                self._pause(vr)
            return None
        if r is R.GET_CONFIG:
            off, size, flags = p.CONFIG_HEADER.unpack_from(msg.payload)
            # Past the fields the device defines, config space reads as zero (QEMU may ask
            # for the size of its own, newer struct).
            cfg = self.device.config().ljust(p.MAX_CONFIG, b"\0")
            if off + size > p.MAX_CONFIG:
                raise VhostUserError(
                    f"GET_CONFIG offset {off} size {size} beyond config space of "
                    f"{p.MAX_CONFIG} bytes"
                )
            return p.CONFIG_HEADER.pack(off, size, flags) + cfg[off : off + size]
        if r is R.SET_CONFIG:
            off, size, _ = p.CONFIG_HEADER.unpack_from(msg.payload)
            self.device.write_config(off, msg.payload[p.CONFIG_HEADER.size :])
            return None
        if r is R.GET_INFLIGHT_FD:
            _, _, nq, qs = p.inflight(msg)
            if nq > len(self.vrings):
                raise VhostUserError(
                    f"GET_INFLIGHT_FD: {nq} queues requested, device has {len(self.vrings)}"
                )
            fd, size = infl.create(nq, qs)
            self._reply_fds.append(fd)
            return p.INFLIGHT.pack(size, 0, nq, qs)
        if r is R.SET_INFLIGHT_FD:
            size, off, nq, qs = p.inflight(msg)
            region = infl.InflightRegion(msg.fds[0], size, off, nq, qs)
            for vr in self.vrings:  # running rings re-attach to the new region
                self._stop_ring(vr)
                vr.inflight = None
            if self.inflight is not None:
                self.inflight.close()
            self.inflight = region
            for vr in self.vrings:
                self._try_start(vr)
            log.info(
                "%s: inflight region %d bytes, %d queues of %d", self.device.name, size, nq, qs
            )
            return None
        if r is R.GET_MAX_MEM_SLOTS:
            return p.U64.pack(p.MAX_MEM_SLOTS)
        if r is R.ADD_MEM_REG:
            self._add_region(p.mem_reg(msg), msg.fds[0])
            return None
        if r is R.REM_MEM_REG:
            self._remove_region(p.mem_reg(msg))
            return None
        if r is R.SET_STATUS:
            self.status = msg.u64() & 0xFF
            log.info("%s: device status %#x", self.device.name, self.status)
            return None
        if r is R.GET_STATUS:
            broken = any(vr.broken for vr in self.vrings)
            return p.U64.pack(self.status | (STATUS_NEEDS_RESET if broken else 0))
        if r is R.SET_LOG_BASE or r is R.SET_LOG_FD:
            raise VhostUserError(f"{r.name}: dirty logging (migration) is not offered")
        raise VhostUserError(f"{r.name} is not supported by this back-end")

    def _set_mem_table(self, regions: list[p.MemRegion], fds: list[int]) -> None:
        mem = GuestMemory()
        try:
            for i, (reg, fd) in enumerate(zip(regions, fds, strict=True)):
                region = mem.add_file(fd, reg.gpa, reg.size, reg.offset, uva=reg.uva)
                self._unsealed(f"SET_MEM_TABLE region {i}", fd, region)
        except (OSError, BackendError) as e:
            mem.close()
            raise VhostUserError(f"SET_MEM_TABLE: cannot map region: {e}") from e
        for vr in self.vrings:
            self._stop_ring(vr)
        self.stats.refused += self.mem.refused
        self.stats.vanished_pages += self.mem.vanished_pages
        self.mem.close()
        self.mem = mem
        self._memory_changed()

    def _add_region(self, reg: p.MemRegion, fd: int) -> None:
        if len(self.mem.regions) >= p.MAX_MEM_SLOTS:
            raise VhostUserError(f"ADD_MEM_REG: all {p.MAX_MEM_SLOTS} memory slots in use")
        # Engine threads work on the memory table they started with: take their rings back
        # while the table grows, then hand them the new one.
        paused = [vr for vr in self.vrings if self._pause(vr)]
        try:
            region = self.mem.add_file(fd, reg.gpa, reg.size, reg.offset, uva=reg.uva)
            self._unsealed("ADD_MEM_REG region", fd, region)
        except (OSError, BackendError) as e:
            raise VhostUserError(f"ADD_MEM_REG: cannot map region: {e}") from e
        finally:
            self._memory_changed()
            for vr in paused:
                if vr.enabled:
                    self._serve(vr)

    def _unsealed(self, what: str, fd: int, region: Region) -> None:
        """Sealed files cannot shrink under us; the others (memory-backend-file on /dev/shm
        or hugetlbfs, memfd with seal=off) are served, counted and named in the log; if one
        shrinks, the SIGBUS safety net (memory.py) turns its vanished pages into zeros."""
        if region.unsealed is None:
            return
        self.stats.unsealed_regions += 1
        try:
            kind = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            kind = "?"
        log.warning(
            "%s: %s %s (fd %d: %s) cannot be sealed against shrinking: %s; served anyway "
            "(pages that vanish read as zeros and count as vanished_pages)",
            self.device.name, what, region.describe(), fd, kind, region.unsealed,
        )  # fmt: skip

    def _remove_region(self, reg: p.MemRegion) -> None:
        key = (reg.gpa, reg.size, reg.uva)
        found = next((r for r in self.mem.regions if (r.gpa, r.size, r.uva) == key), None)
        if found is None:
            raise VhostUserError(
                f"REM_MEM_REG: no region gpa {reg.gpa:#x} size {reg.size:#x} uva {reg.uva:#x} "
                f"is mapped ({self.mem.describe()})"
            )
        # Rings are re-mapped against what remains; their indices survive in vr.base.
        for vr in self.vrings:
            self._stop_ring(vr)
        self.stats.vanished_pages += found.vanished_pages
        self.mem.remove(found.gpa)
        self._memory_changed()

    def _memory_changed(self) -> None:
        self.stats.mapped_bytes = self.mem.mapped_bytes
        log.info(
            "%s: guest memory %s (%d bytes)",
            self.device.name,
            self.mem.describe(),
            self.mem.mapped_bytes,
        )
        for vr in self.vrings:
            self._try_start(vr)

    # -- rings ----------------------------------------------------------------------------

    def _try_start(self, vr: Vring) -> None:
        if not vr.ready() or not self.mem.regions:
            return
        region = self.inflight
        iq = region.queue(vr.index) if region is not None else None
        try:
            q = vr.start(self.mem, bool(self.features >> p.F_EVENT_IDX & 1), iq)
        except BackendError as e:
            vr.queue = None
            self._break(vr, f"vring {vr.index}: {e}")
            return
        self._open_aio(vr)
        if vr.aio is None:  # else the engine's thread waits on the kick fd
            self.loop.add_reader(vr.kick, lambda: self._kicked(vr))
        log.info(
            "%s: vring %d started: %d entries, desc gpa %#x, avail idx %d%s",
            self.device.name,
            vr.index,
            vr.num,
            q.desc,
            q.last_avail_idx,
            ", inflight tracked" if vr.inflight is not None else "",
        )
        if vr.enabled:  # the driver may have queued requests while no back-end was there
            self._serve(vr)

    def _stop_ring(self, vr: Vring) -> None:
        if vr.aio is not None:
            self.loop.remove_reader(vr.aio.wakeup_fd)
        try:
            if vr.stop(self.mem):
                self.device.queue_stopped(vr.index)  # its deferred chains are not ours now
        except BackendError as e:  # stopped all the same; _break drops the device's chains
            self._break(vr, f"vring {vr.index}: {e}")
        if vr.kick >= 0:
            self.loop.remove_reader(vr.kick)

    def _open_aio(self, vr: Vring) -> None:
        """A blk device's asynchronous engine for this ring (cache=none), on the C ring only."""
        d = self.device
        if not (self.fastpath and isinstance(d, BlockDevice) and BlkAio is not None
                and hasattr(vr.queue, "serve_blk")):  # fmt: skip
            return
        try:
            vr.aio = d.open_aio(vr.num, BlkAio)
        except OSError as e:
            log.error("%s: vring %d: no asynchronous engine (%s): requests served by the "
                      "Python path", d.name, vr.index, e)  # fmt: skip
            return
        if vr.aio is not None:
            vr.blk, vr.threaded = d, True
            self.loop.add_reader(vr.aio.wakeup_fd, lambda: self._aio_wakeup(vr))
            log.info("%s: vring %d: %s on its own thread (%s)", d.name, vr.index,
                     vr.aio.engine, vr.aio.reason)  # fmt: skip

    def _aio_wakeup(self, vr: Vring) -> None:
        try:
            vr.wakeup(self.device, self.mem)
        except BackendError as e:
            self._break(vr, f"vring {vr.index}: {e}")
        except OSError as e:
            log.error("%s: vring %d: %s", self.device.name, vr.index, e)

    def _pause(self, vr: Vring) -> bool:
        """Take a ring back from its engine thread (before its fds change); True if it ran."""
        try:
            return vr.pause(self.mem)
        except BackendError as e:
            self._break(vr, f"vring {vr.index}: {e}")
            return False

    def _break(self, vr: Vring, why: str) -> None:
        vr.broken = why
        msg = f"{self.device.name}: {why}"
        self.stats.broken.append(msg)
        log.error("%s (queue marked broken; other devices keep running)", msg)
        self.device.queue_stopped(vr.index)
        vr.signal_err()

    def _kicked(self, vr: Vring) -> None:
        try:
            os.read(vr.kick, 8)
        except BlockingIOError:
            pass
        vr.stats.kicks += 1
        if vr.queue is not None and vr.enabled and not vr.broken:
            self._serve(vr)

    def _serve(self, vr: Vring) -> None:
        try:
            vr.serve(self.device, self.mem, self.fastpath)
        except BackendError as e:
            self._break(vr, f"vring {vr.index}: {e}")
        except OSError as e:  # the call eventfd went away: the front-end is resetting us
            log.error("%s: vring %d: %s", self.device.name, vr.index, e)

    def in_flight(self) -> int:
        """Chains taken from avail rings and not yet completed (0 between loop callbacks)."""
        return sum(vr.inflight.in_flight() for vr in self.vrings if vr.inflight is not None)

    def snapshot(self) -> dict:
        d = self.device
        for vr in self.vrings:
            vr.sync_stats()  # what engine threads served since the last snapshot
        return {
            "device": d.name,
            "socket": self.path,
            "connected": self.conn is not None,
            "connections": self.stats.connections,
            "mapped_bytes": self.mem.mapped_bytes or self.stats.mapped_bytes,
            "memory": self.mem.describe(),
            "refused": self.stats.refused + self.mem.refused,
            "unsealed_regions": self.stats.unsealed_regions,
            "vanished_pages": self.stats.vanished_pages + self.mem.vanished_pages,
            "protocol_errors": self.stats.protocol_errors,
            "broken": list(self.stats.broken),
            "requests": d.stats.requests,
            "bytes_read": d.stats.bytes_read,
            "bytes_written": d.stats.bytes_written,
            "errors": d.stats.errors,
            "by_type": dict(d.stats.by_type),
            "features": self.features,
            "protocol_features": self.protocol_features,
            "status": self.status,
            "inflight_region": self.inflight.size if self.inflight is not None else 0,
            "queues": [v.snapshot() for v in self.vrings],
            **({"state": d.snapshot()} if d.snapshot() else {}),
        }
