"""atheris target: vhost-user message *sequences* against a real ``edgevirt backend run``
process (blk on a disk file, rng), the way a buggy or hostile VMM would drive it.

Each input is a run of front-end sessions on the blk or the rng socket (a new one when the
back-end dropped the last): up to 24 steps chosen by the input from a structure-aware
vocabulary — feature negotiation in any order (GET/SET
features and protocol features, SET_OWNER, RESET_OWNER), memory tables (valid, bogus
geometry, fds of the wrong kind: eventfd, pipe, /dev/null, a directory; too few or too many
fds), ADD/REM_MEM_REG while queues run, SET_VRING_* on configured, unconfigured and
out-of-range queues (ring addresses inside and outside the region), KICK/CALL with
eventfds or other fds, INFLIGHT and mem-slot messages interleaved, SET/GET_STATUS,
GET_CONFIG, garbage headers; and guest-side actions: a real split ring laid out in the
shared memfd (``DriverQueue``) with a valid request, random bytes written over the ring or
the buffers, a kick; and the front-end shrinking its memfd under the back-end's mapping.

Every step ends with a barrier (fuzz/seqharness.py): a GET_FEATURES whose reply proves the
back-end handled everything before it; other replies are read and dropped on the way.
Checked after every step: the back-end process is alive, and the guard pages of the
memfd — one page before and one after the region the front-end declares (mapped by the
back-end only if it mishandled ``mmap_offset`` or a size) — still hold their pattern, i.e.
nothing was written outside the declared region. After the session's disconnect: the
back-end's open-fd count returns to its baseline, its RSS stays within 64 MiB of it and the
guard pages are checked once more. A dead back-end is restarted for the next input after
the failure is reported.

The back-end is another process, so atheris sees only the front-end's coverage: the
generator's structure, not coverage feedback, is what reaches deep states.

    PYTHONPATH=. nice .venv/bin/python fuzz/fuzz_vhost_user_seq.py -max_len=512 \\
        -len_control=0 -timeout=300 -max_total_time=1800
"""

import array
import mmap
import os
import socket
import sys
import time
from pathlib import Path

import atheris
import seqharness

with atheris.instrument_imports(include=["edgevirt"]):
    from edgevirt.backend.memory import GuestMemory, Region
    from edgevirt.backend.transport.vhost_user import protocol as p
    from edgevirt.backend.transport.vhost_user.protocol import Request as R
    from edgevirt.backend.virtq.driver import DriverQueue

PAGE = 4096
GPA = 0x5C00_0000
SIZE = 256 * PAGE  # the declared region
UVA = 0x7F00_0000_0000
CANARY = 0xA5
BARRIER_TIMEOUT = 30.0  # GET_FEATURES is answered at once; this is a hang


def _argv(d: Path) -> list[str]:
    for sock in d.glob("*.sock"):  # a dead predecessor's: _ready must see the new ones
        sock.unlink()
    return ["-m", "edgevirt", "backend", "run", "--device", f"blk:path={d / 'disk.img'}",
            "--device", "rng", "--socket-dir", str(d)]  # fmt: skip


def _ready(d: Path) -> bool:
    return all((d / n).exists() for n in ("0-blk.sock", "1-rng.sock"))


class Session:
    """One front-end connection with its memfd (guard page | region | guard page)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(BARRIER_TIMEOUT)
        # A unix socket with a timeout reports a full backlog (the back-end's loop has not
        # accepted the previous attempt yet) as EAGAIN at once: retry, but only for so long.
        deadline = time.monotonic() + 5
        while True:
            try:
                self.sock.connect(str(path))
                break
            except (BlockingIOError, ConnectionRefusedError):  # bound, not listening yet
                assert time.monotonic() < deadline, f"back-end accepts no connection on {path}"
                time.sleep(0.001)
        # Sealable, as QEMU's memory-backend-memfd makes it: the back-end seals it.
        self.memfd = os.memfd_create("edgevirt-fuzz", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.memfd, SIZE + 2 * PAGE)
        self.map = mmap.mmap(self.memfd, SIZE + 2 * PAGE, flags=mmap.MAP_SHARED)
        self.map[:PAGE] = bytes([CANARY]) * PAGE
        self.map[PAGE + SIZE :] = bytes([CANARY]) * PAGE
        # The guest's view of the region: the middle of the memfd.
        self.region_map = mmap.mmap(self.memfd, SIZE, flags=mmap.MAP_SHARED, offset=PAGE)
        self.mem = GuestMemory([Region(gpa=GPA, size=SIZE, buf=self.region_map, uva=UVA)])
        self.extra: list[int] = []  # fds we made and must close
        self.usable = True
        self.released = False
        self.drv: DriverQueue | None = None
        self.kick = -1
        self.inbox = b""  # bytes from the back-end not parsed into messages yet
        self.expected = 0  # GET_FEATURES replies still to come (the barrier's is the last)
        # The guard pages prove something only while the memfd went to the back-end solely
        # as the declared region: a bent region or the memfd as an inflight fd hands it
        # other bytes to write, legitimately.
        self.guards_valid = True

    def check(self) -> None:
        assert not self.guards_valid or (
            self.map[:PAGE].count(CANARY) == PAGE and self.map[PAGE + SIZE :].count(CANARY) == PAGE
        ), "the back-end wrote outside the declared region"

    check_final = check  # a kick handled after the last barrier shows here

    def fd(self, kind: int, canonical: bool = False) -> int:
        if kind == 4 and not canonical:
            self.guards_valid = False
        if kind == 0:
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        elif kind == 1:
            r, w = os.pipe()
            self.extra.append(w)
            fd = r
        elif kind == 2:
            fd = os.open("/dev/null", os.O_RDWR)
        elif kind == 3:
            fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
        else:
            fd = os.dup(self.memfd)
        self.extra.append(fd)
        return fd

    def send(self, req: int, payload: bytes, fds: list[int], flags: int = p.VERSION) -> None:
        anc = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        )
        try:
            self.sock.sendmsg([p.HEADER.pack(req, flags, len(payload)) + payload], anc)
        except OSError:
            self.usable = False
            return
        if req == R.GET_FEATURES:  # always answered (steps send it with a valid header only)
            self.expected += 1

    def barrier(self) -> bool:
        """GET_FEATURES is always answered and messages are handled in order: once its
        reply is in, every earlier message was handled. Other replies are read and dropped."""
        if not self.usable:
            return True
        self.send(R.GET_FEATURES, b"", [])
        while self.usable and self.expected:
            try:
                data, anc, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
            except TimeoutError:
                return False
            except OSError:
                data, anc = b"", []
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(cdata[: len(cdata) - len(cdata) % 4])
                    for fd in fds:
                        os.close(fd)
            if not data:
                self.usable = False  # the back-end dropped us: that answers too
                break
            self.inbox += data
            while len(self.inbox) >= p.HEADER.size:
                req, _, size = p.HEADER.unpack_from(self.inbox)
                if len(self.inbox) < p.HEADER.size + size:
                    break
                self.inbox = self.inbox[p.HEADER.size + size :]
                if req == R.GET_FEATURES:
                    self.expected -= 1
        return True

    def disconnect(self) -> None:
        self.sock.close()
        self.usable = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.sock.close()
        for fd in self.extra:
            os.close(fd)
        self.region_map.close()
        self.map.close()
        os.close(self.memfd)


def _region(fdp: atheris.FuzzedDataProvider) -> tuple[bytes, bool]:
    """A MEM_REGION: usually the real one, sometimes with a field bent out of shape."""
    gpa, size, uva, off = GPA, SIZE, UVA, PAGE
    bend = fdp.ConsumeIntInRange(0, 7)
    odd = fdp.PickValueInList([0, 1, PAGE, SIZE, SIZE + PAGE, 2**63, 2**64 - PAGE, 2**64 - 1])
    if bend == 1:
        size = odd
    elif bend == 2:
        off = odd
    elif bend == 3:
        gpa = odd
    elif bend == 4:
        uva = odd
    return p.MEM_REGION.pack(gpa, size & (2**64 - 1), uva, off & (2**64 - 1)), bend in (1, 2)


def step(s: Session, fdp: atheris.FuzzedDataProvider) -> None:
    op = fdp.ConsumeIntInRange(0, 20)
    q = fdp.PickValueInList([0, 0, 0, 1, 2, 255, 0x1FF])
    flags = p.VERSION | (p.FLAG_NEED_REPLY if fdp.ConsumeBool() else 0)
    req: int
    payload, fds = b"", []
    if op == 0:
        req = fdp.PickValueInList([R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.SET_OWNER,
                                   R.RESET_OWNER, R.GET_QUEUE_NUM, R.GET_MAX_MEM_SLOTS,
                                   R.GET_STATUS, R.RESET_DEVICE])  # fmt: skip
    elif op == 1:
        req = fdp.PickValueInList([R.SET_FEATURES, R.SET_PROTOCOL_FEATURES])
        bits = fdp.PickValueInList([0, 1 << 32 | 1 << 33 | 1 << 30, 2**64 - 1, 0x3F])
        payload = p.U64.pack(bits if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 2**64 - 1))
    elif op == 2:
        req = R.SET_MEM_TABLE
        n = fdp.ConsumeIntInRange(0, 3)
        payload = p.MEM_HEADER.pack(n if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 12), 0)
        regions = [_region(fdp) for _ in range(n)]
        payload += b"".join(r for r, _ in regions)
        kinds = [
            fdp.PickValueInList([4, 4, 4, 0, 1, 2, 3])
            for _ in range(fdp.ConsumeIntInRange(0, n + 1))
        ]
        straight = len(kinds) == n and not any(bent for _, bent in regions)
        fds = [s.fd(k, canonical=straight) for k in kinds]
    elif op == 3:
        req = fdp.PickValueInList([R.ADD_MEM_REG, R.REM_MEM_REG])
        region, bent = _region(fdp)
        payload = p.MEM_REG.pack(0) + region
        if req == R.ADD_MEM_REG or fdp.ConsumeBool():
            fds = [s.fd(fdp.PickValueInList([4, 4, 0, 2]), canonical=not bent)]
    elif op == 4:
        req = R.SET_VRING_NUM
        payload = p.VRING_STATE.pack(q, fdp.PickValueInList([0, 1, 3, 8, 64, 256, 32768, 65535]))
    elif op == 5:
        req = fdp.PickValueInList([R.SET_VRING_BASE, R.GET_VRING_BASE, R.SET_VRING_ENABLE])
        payload = p.VRING_STATE.pack(q, fdp.PickValueInList([0, 1, 7, 65535, 2**32 - 1]))
    elif op == 6:
        req = R.SET_VRING_ADDR
        base = UVA + fdp.PickValueInList([0, 0, PAGE, SIZE - 64, SIZE, SIZE + PAGE])
        desc, avail, used = base, base + 0x400, base + 0x800
        if fdp.ConsumeBool():
            desc = fdp.ConsumeIntInRange(0, 2**64 - 1)
        payload = p.VRING_ADDR.pack(q, fdp.ConsumeIntInRange(0, 1), desc, used, avail, 0)
    elif op == 7:
        req = fdp.PickValueInList([R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR])
        nofd = fdp.ConsumeBool() and fdp.ConsumeBool()
        payload = p.U64.pack(q | (p.VRING_NOFD_MASK if nofd else 0))
        if not nofd or fdp.ConsumeBool():
            fds = [s.fd(fdp.PickValueInList([0, 0, 0, 1, 2, 4]))]
    elif op == 8:
        req = fdp.PickValueInList([R.GET_INFLIGHT_FD, R.SET_INFLIGHT_FD])
        nq = fdp.PickValueInList([1, 2, 0, 0xFFFF])
        qs = fdp.PickValueInList([64, 256, 0, 3, 0xFFFF])
        size = fdp.PickValueInList([0, PAGE, 2**40, 64 * 1024])
        payload = p.INFLIGHT.pack(size, fdp.PickValueInList([0, PAGE, 2**63]), nq, qs)
        if req == R.SET_INFLIGHT_FD:
            fds = [s.fd(fdp.PickValueInList([4, 0, 2]))]
    elif op == 9:
        req = fdp.PickValueInList([R.SET_STATUS, R.GET_CONFIG, R.SET_CONFIG])
        if req == R.SET_STATUS:
            payload = p.U64.pack(fdp.PickValueInList([0, 1, 3, 7, 11, 15, 0x40, 0xFF]))
        else:
            off = fdp.PickValueInList([0, 4, 255, 256, 2**31])
            n = fdp.PickValueInList([0, 8, 60, 256, 4000])
            payload = p.CONFIG_HEADER.pack(off, n, 0) + bytes(min(n, 300))
    elif op == 10:  # the guest: a real ring with a request, then a kick
        _guest_request(s, fdp)
        return
    elif op == 11:  # the guest scribbles over its ring or buffers (inside the region only)
        off = fdp.ConsumeIntInRange(0, SIZE - 1)
        data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 64))
        s.region_map[off : off + len(data)] = data[: SIZE - off]
        return
    elif op == 12:  # a whole standard bring-up of queue q (what QEMU does)
        _bring_up(s, q if q < 2 else 0)
        return
    elif op == 13:  # the front-end shrinks its memory file under the back-end's mapping
        _shrink(s, fdp.PickValueInList([0, PAGE, SIZE // 2, SIZE + PAGE]))
        return
    else:  # raw garbage: any request code, any size field, any payload
        req = fdp.ConsumeIntInRange(0, 60)
        req = 0 if req == R.GET_FEATURES else req  # the barrier counts GET_FEATURES replies
        payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 80))
        flags = fdp.PickValueInList([p.VERSION, 0, 2, p.VERSION | p.FLAG_REPLY, 0xFFFFFFFF])
        if fdp.ConsumeBool():
            fds = [s.fd(fdp.ConsumeIntInRange(0, 4))]
    s.send(req, payload, fds, flags)  # replies are read (and dropped) by the barrier


def _bring_up(s: Session, q: int) -> None:
    s.send(R.SET_FEATURES, p.U64.pack(1 << 32 | 1 << 33 | 1 << 30), [])
    s.send(R.SET_MEM_TABLE, p.MEM_HEADER.pack(1, 0) + p.MEM_REGION.pack(GPA, SIZE, UVA, PAGE),
           [s.fd(4, canonical=True)])  # fmt: skip
    s.drv = DriverQueue(s.mem, 64, base=GPA + q * 0x4000)
    d = s.drv
    s.send(R.SET_VRING_NUM, p.VRING_STATE.pack(q, 64), [])
    s.send(R.SET_VRING_BASE, p.VRING_STATE.pack(q, 0), [])
    s.send(R.SET_VRING_ADDR, p.VRING_ADDR.pack(q, 0, UVA + d.desc - GPA, UVA + d.used - GPA,
                                               UVA + d.avail - GPA, 0), [])  # fmt: skip
    s.send(R.SET_VRING_CALL, p.U64.pack(q), [s.fd(0)])
    s.kick = s.fd(0)
    s.send(R.SET_VRING_KICK, p.U64.pack(q), [s.kick])
    s.send(R.SET_VRING_ENABLE, p.VRING_STATE.pack(q, 1), [])


def _shrink(s: Session, size: int) -> None:
    """ftruncate the memfd (refused once the back-end sealed it); if that worked, make the
    back-end touch its mapping (a kick, then the barrier), then give the file its size back.
    A back-end mapping an unsealed file would die of SIGBUS here."""
    try:
        os.ftruncate(s.memfd, size)
    except PermissionError:  # sealed (F_SEAL_SHRINK): what the back-end should have done
        return
    if s.kick >= 0:
        os.eventfd_write(s.kick, 1)
    s.barrier()
    os.ftruncate(s.memfd, SIZE + 2 * PAGE)  # the pages come back as zeros: guards lost
    s.map[:PAGE] = s.map[PAGE + SIZE :] = bytes([CANARY]) * PAGE


def _guest_request(s: Session, fdp: atheris.FuzzedDataProvider) -> None:
    if s.drv is None or s.kick < 0:
        return
    d = s.drv
    sector = fdp.ConsumeIntInRange(0, 10000)
    kind = fdp.PickValueInList([0, 1, 4, 8, 0xFFFF])  # IN, OUT, FLUSH, GET_ID, junk
    header = kind.to_bytes(4, "little") + bytes(4) + sector.to_bytes(8, "little")
    length = fdp.PickValueInList([512, 4096, 1, 0, 8192])
    try:
        if kind == 1:
            d.add([header, bytes(length)], [1])
        else:
            d.add([header], [length, 1] if length else [1])
    except Exception as e:  # the driver refused (ring full, no buffer space): the guest's problem
        if type(e).__module__.startswith("edgevirt") or isinstance(e, ValueError):
            s.drv = DriverQueue(s.mem, 64, base=d.desc)  # start over on the same ring memory
            return
        raise
    os.eventfd_write(s.kick, 1)


def served_once() -> bool:
    """A correct bring-up and one 512-byte read on blk queue 0 are served (the generator's
    ``_bring_up`` and ``_guest_request`` speak the protocol right; a test runs this)."""
    s = Session(backend.dir / "0-blk.sock")
    try:
        _bring_up(s, 0)
        assert s.drv is not None and s.barrier()
        s.drv.add([bytes(16)], [512, 1])  # VIRTIO_BLK_T_IN, sector 0
        os.eventfd_write(s.kick, 1)
        deadline = time.monotonic() + 5
        while s.drv.used_idx == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        return s.drv.used_idx == 1
    finally:
        s.release()


backend = seqharness.BackendProcess("edgevirt-vuseq-", _argv, _ready, lambda d: None)


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    sock = backend.dir / ("0-blk.sock" if fdp.ConsumeBool() else "1-rng.sock")
    seqharness.run_input(backend, fdp, lambda: Session(sock), step)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
