"""The virtio-msg back-end process: carve-out mapping, one bus, a stats file.

The carve-out is a file (QEMU's ``memory-backend-file``, or a hypervisor's shared-memory
device such as an ivshmem BAR in sysfs) mapped at its guest-physical address; it is the
only guest memory the back-end maps. The message memory is the bus's own memfd (server
mode) or a PCI BAR (peer mode, :mod:`.pcilink`, used inside the service VM). Statistics
are rewritten atomically to ``stats_path`` whenever they change (at most every 0.2 s) by
the same :class:`~edgevirt.backend.statsfile.StatsFile` and serve loop as
:mod:`edgevirt.backend.service` for vhost-user, with the same per-device keys so launchers
can check both alike.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from edgevirt.backend.devices import VirtioDevice, parse_device
from edgevirt.backend.loop import Loop
from edgevirt.backend.memory import GuestMemory
from edgevirt.backend.statsfile import StatsFile, process_stats, serve_until_signal
from edgevirt.backend.transport.virtio_msg.bus import MsgBus
from edgevirt.backend.transport.virtio_msg.pcilink import PeerLink
from edgevirt.errors import BackendError, EdgevirtError

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def map_carveout(path: str | os.PathLike[str], gpa: int, size: int | None = None) -> GuestMemory:
    """Map ``size`` bytes (default: the whole file) of ``path`` as guest-physical ``gpa``.

    The carve-out file comes from the operator (the same file QEMU maps with share=on), not
    from a peer: no guest and no virtio-msg driver can change its size. It is sealed against
    shrinking when it can be (a memfd passed as /proc/PID/fd/N); a regular, tmpfs or
    hugetlbfs file cannot be, and is mapped anyway (info in the log) under the SIGBUS safety
    net of memory.py: pages a local process truncates away read as zeros."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise BackendError(f"carve-out file {path}: {e.strerror}") from e
    try:
        have = os.fstat(fd).st_size
        size = have if size is None else size
        if size <= 0 or size > have:
            raise BackendError(f"carve-out file {path} holds {have:#x} bytes, {size:#x} requested")
        mem = GuestMemory()
        region = mem.add_file(fd, gpa, size)
        if region.unsealed:
            log.info("carve-out file %s cannot be sealed against shrinking: %s", path,
                     region.unsealed)  # fmt: skip
        return mem
    finally:
        os.close(fd)


class MsgService:
    def __init__(
        self,
        devices: Sequence[VirtioDevice],
        mem: GuestMemory,
        socket_path: str | None,
        stats_path: Path | None = None,
        poll_interval: float | None = None,
        *,
        link: PeerLink | None = None,
    ) -> None:
        """Server mode (``socket_path``: we are the ivshmem server) or peer mode (``link``:
        a PCI device of the VM we run in, see :mod:`.pcilink`)."""
        self.loop = Loop()
        self.mem = mem
        self.stats_path = stats_path
        self.stats = StatsFile(stats_path)
        self.bus = MsgBus(
            devices,
            mem,
            self.loop,
            socket_path=socket_path,
            poll_interval=poll_interval,
            link=link,
        )
        self.loop.every(0.2, self.write_stats)

    def snapshot(self) -> dict:
        return {**process_stats(self.loop), **self.bus.snapshot()}

    def write_stats(self, force: bool = False) -> None:
        self.stats.write(self.snapshot(), force)

    def run(self) -> None:
        try:
            serve_until_signal(self.loop, self.stats, self.snapshot)
        finally:
            self.close()

    def close(self) -> None:
        self.write_stats(force=True)  # the last word: counters as they stand, running false
        self.bus.close()
        self.mem.close()
        self.loop.close()


def _int(text: str) -> int:
    return int(text, 0)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edgevirt.backend.transport.virtio_msg``: until ``edgevirt backend run``
    grows ``--transport msg``. Logs to stderr; prints nothing else."""
    ap = argparse.ArgumentParser(prog="python -m edgevirt.backend.transport.virtio_msg")
    ap.add_argument("--socket", required=True, help="ivshmem server socket for QEMU")
    ap.add_argument("--carveout-file", required=True)
    ap.add_argument("--carveout-base", type=_int, required=True, help="guest-physical address")
    ap.add_argument("--carveout-size", type=_int, default=None)
    ap.add_argument("--device", action="append", default=[], help="blk:path=FILE | rng")
    ap.add_argument("--stats", type=Path, default=None)
    ap.add_argument("--poll-interval", type=float, default=None)
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    devices: list[VirtioDevice] = []
    try:
        mem = map_carveout(args.carveout_file, args.carveout_base, args.carveout_size)
        for spec in args.device:
            devices.append(parse_device(spec))
        log.info("carve-out %s; devices %s", mem.describe(), [d.name for d in devices])
        MsgService(devices, mem, args.socket, args.stats, args.poll_interval).run()
    except EdgevirtError as e:
        log.error("%s", e)
        for d in devices:
            d.close()
        return 1
    return 0


def peer_main(
    prog: str,
    argv: Sequence[str] | None,
    build: Callable[[Path], MsgService],
    errors: tuple[type[Exception], ...] = (EdgevirtError,),
) -> int:
    """The entry point of a back-end that a service domain's ``/init`` starts with
    ``--config FILE``: ``build`` makes the service from that file, then it serves until
    a signal. A failure to build it that is one of ``errors`` is logged and returns 1
    (anything else is a bug and keeps its traceback). EDGEVIRT-BACKEND-READY in the log
    (``/run/edgevirt/backend.log``) marks the moment the bus is up."""
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    try:
        service = build(args.config)
    except errors as e:
        log.error("%s", e)
        return 1
    log.info("EDGEVIRT-BACKEND-READY")
    service.run()
    return 0
