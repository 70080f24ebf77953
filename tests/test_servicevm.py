"""Service-VM parts without a VM: the host's ivshmem server with fixed peer IDs, the
back-end's peer mode over a (fake) sysfs PCI device, its configuration, and the
service-VM image helpers (dependency parsing, merged-/usr paths, .pyc, extension list)."""

from __future__ import annotations

import importlib.util
import json
import marshal
import mmap
import os
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgevirt.backend.devices import RngDevice
from edgevirt.backend.loop import Loop
from edgevirt.backend.memory import GuestMemory
from edgevirt.backend.transport.virtio_msg import ivshmem
from edgevirt.backend.transport.virtio_msg import protocol as p
from edgevirt.backend.transport.virtio_msg.bus import MsgBus
from edgevirt.backend.transport.virtio_msg.channel import MAGIC, MessageMemory
from edgevirt.backend.transport.virtio_msg.pcilink import PciDoorbellLink
from edgevirt.backend.transport.virtio_msg.protocol import MsgId, VirtioMsgError
from edgevirt.errors import ConfigError
from edgevirt.image import python_cross as pc
from edgevirt.image.rootfs import _guest
from edgevirt.paths import PROJECT_ROOT
from edgevirt.servicevm.hypervisor import Hypervisor
from edgevirt.servicevm.peer import parse_config

# -- the host side --------------------------------------------------------------------------


@pytest.fixture
def hv(tmp_path: Path) -> Iterator[Hypervisor]:
    h = Hypervisor(
        tmp_path / "carveout", 1 << 20, tmp_path / "msg", 64 << 10,
        [("service", tmp_path / "svc.sock", 1), ("front-end", tmp_path / "fe.sock", 2)],
        state=tmp_path / "state.json",
    )  # fmt: skip
    t = threading.Thread(target=h.run, daemon=True)
    t.start()
    yield h
    h.running = False
    t.join(5)


def _wait(cond: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_hypervisor_fixed_ids_shared_memory_and_doorbells(hv: Hypervisor, tmp_path: Path) -> None:
    svc = ivshmem.connect(str(tmp_path / "svc.sock"), 2)
    fe = ivshmem.connect(str(tmp_path / "fe.sock"), 2)
    try:
        assert (svc.id, fe.id) == (1, 2)
        assert os.fstat(svc.shm_fd).st_size == os.fstat(fe.shm_fd).st_size == 64 << 10
        # the service VM learns the front-end's eventfds when it attaches (peer update)
        _wait(lambda: _collect(svc, 2))
        assert list(fe.eventfds) == [1]
        # same memory: a write through one mapping shows in the other
        a = mmap.mmap(svc.shm_fd, 4096)
        b = mmap.mmap(fe.shm_fd, 4096)
        a[:4] = b"VMSG"
        assert b[:4] == b"VMSG"
        a.close()
        b.close()
        # a doorbell: front-end rings peer 1 vector 0 → the service's own eventfd 0 fires
        ivshmem.ring(fe.eventfds[1][0])
        assert ivshmem.drain(svc.own[0]) == 1

        def both_attached() -> bool:
            peers = json.loads((tmp_path / "state.json").read_text())["peers"]
            return bool(peers["service"]["attached"] and peers["front-end"]["attached"])

        _wait(both_attached)  # the state file follows the peer announcements
    finally:
        fe.close()
        svc.close()


def _collect(peer: ivshmem.Peer, pid: int) -> bool:
    """Read peer announcements that arrived after setup."""
    import array
    import socket

    peer.sock.setblocking(False)
    try:
        while True:
            fds = array.array("i")
            data, anc, _, _ = peer.sock.recvmsg(8, socket.CMSG_SPACE(4))
            if not data:
                break
            for _, _, cdata in anc:
                fds.frombytes(cdata)
            value = struct.unpack("<q", data)[0]
            if fds:
                peer.eventfds.setdefault(value, []).extend(fds)
            else:
                for fd in peer.eventfds.pop(value, []):
                    os.close(fd)
    except BlockingIOError:
        pass
    return len(peer.eventfds.get(pid, [])) == 2


def test_hypervisor_refuses_second_connection_and_keeps_doorbells_over_a_hangup(
    hv: Hypervisor, tmp_path: Path
) -> None:
    svc = ivshmem.connect(str(tmp_path / "svc.sock"), 2)
    fe = ivshmem.connect(str(tmp_path / "fe.sock"), 2)
    try:
        _wait(lambda: _collect(svc, 2))
        with pytest.raises(VirtioMsgError):
            ivshmem.connect(str(tmp_path / "fe.sock"), 2, timeout=2)
        fe.close()

        def detached() -> bool:
            return not json.loads((tmp_path / "state.json").read_text())["peers"]["front-end"][
                "attached"
            ]

        _wait(detached)
        # not announced (QEMU 7.2's ivshmem crashes on a re-used ID after a disconnect)
        assert _collect(svc, 2) and len(svc.eventfds[2]) == 2
        state = json.loads((tmp_path / "state.json").read_text())
        assert state["peers"]["front-end"] == {**state["peers"]["front-end"], "attached": False,
                                              "connections": 1, "refused": 1,
                                              "detaches": 1}  # fmt: skip
    finally:
        svc.close()


def test_hypervisor_removes_its_files(tmp_path: Path) -> None:
    h = Hypervisor(tmp_path / "co", 1 << 20, tmp_path / "msg", 4096,
                   [("service", tmp_path / "s.sock", 1)])  # fmt: skip
    assert (tmp_path / "co").stat().st_size == 1 << 20
    h.close()
    assert not any(tmp_path.iterdir())


def test_hypervisor_is_virtio_free() -> None:
    src = (PROJECT_ROOT / "edgevirt/servicevm/hypervisor.py").read_text()
    assert "import edgevirt" not in src and "from edgevirt" not in src
    assert len(src.splitlines()) < 300


# -- peer mode over a fake sysfs PCI device -------------------------------------------------


def fake_pci(root: Path, name: str, bar2: int, *, enabled: str = "0") -> Path:
    dev = root / name
    dev.mkdir(parents=True)
    (dev / "vendor").write_text("0x1af4\n")
    (dev / "device").write_text("0x1110\n")
    (dev / "enable").write_text(enabled + "\n")
    regs = bytearray(256)
    struct.pack_into("<I", regs, 8, 1)  # IVPosition: we are peer 1
    (dev / "resource0").write_bytes(bytes(regs))
    (dev / "resource2_wc").write_bytes(bytes(bar2))
    return dev


def test_peer_mode_polling_answers_and_rings_the_driver(tmp_path: Path) -> None:
    dev = fake_pci(tmp_path, "0000:00:05.0", 64 << 10)
    link = PciDoorbellLink("0000:00:05.0", 2, sysfs=tmp_path, dev_dir=tmp_path / "dev")
    assert (link.mode, link.own_id) == ("polling", 1)
    assert (dev / "enable").read_text() == "1"  # memory decoding switched on
    bus = MsgBus([RngDevice()], GuestMemory(), Loop(), link=link)
    try:
        drv_map = mmap.mmap(os.open(dev / "resource2_wc", os.O_RDWR), 64 << 10)
        drv = MessageMemory.attach(memoryview(drv_map))
        assert drv.geometry.device_peer == 1
        drv.to_device.put(p.encode(p.request(MsgId.GET_DEVICE_INFO, 0, 7)))
        bus.poll()
        answer = p.decode(drv.to_driver.get() or b"")
        assert answer.response and answer.token == 7 and answer["device_id"] == 4
        doorbell = struct.unpack_from("<I", (dev / "resource0").read_bytes(), 12)[0]
        assert doorbell == 2 << 16 | 0  # the driver's peer id, vector 0
        assert bus.snapshot()["link"]["mode"] == "polling"
        drv.close()
        drv_map.close()
    finally:
        bus.close()


def test_peer_mode_restart_adopts_the_layout_and_indices(tmp_path: Path) -> None:
    fake_pci(tmp_path, "0000:00:05.0", 64 << 10)
    first = MsgBus([RngDevice()], GuestMemory(), Loop(),
                   link=PciDoorbellLink("0000:00:05.0", 2, sysfs=tmp_path))  # fmt: skip
    assert not first.adopted
    first.msgmem.to_driver.put(p.encode(p.event(MsgId.EVENT_USED, 0, index=0)))
    first.close()
    again = MsgBus([RngDevice()], GuestMemory(), Loop(),
                   link=PciDoorbellLink("0000:00:05.0", 2, sysfs=tmp_path))  # fmt: skip
    try:
        assert again.adopted and again.msgmem.to_driver.head == 1
    finally:
        again.close()


def test_peer_mode_refuses_a_device_that_is_not_ivshmem(tmp_path: Path) -> None:
    dev = fake_pci(tmp_path, "0000:00:05.0", 4096)
    (dev / "device").write_text("0x1000\n")
    with pytest.raises(VirtioMsgError, match="1af4:1000, expected ivshmem"):
        PciDoorbellLink("0000:00:05.0", 2, sysfs=tmp_path)


def test_message_memory_magic_is_written_last() -> None:
    buf = memoryview(bytearray(64 << 10))
    MessageMemory.create(buf, 64, 1)
    assert struct.unpack_from("<I", buf, 0)[0] == MAGIC


# -- configuration --------------------------------------------------------------------------

GOOD = {
    "carveout": {"pci": "0000:00:04.0", "base": "0x5c000000", "size": 67108864},
    "msg": {"pci": "0000:00:05.0", "driver_peer": 2},
    "devices": ["blk:path=/dev/vda", "rng"],
}


def test_config_parses_and_round_trips() -> None:
    cfg = parse_config(GOOD)
    assert (cfg.carveout_base, cfg.driver_peer, cfg.nslots) == (0x5C000000, 2, 64)
    assert parse_config(cfg.to_json()) == cfg


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"carveout": {"pci": "00:04.0", "base": 0}}, "carveout.pci"),
        ({"msg": {"pci": "0000:00:05.0"}}, "msg.driver_peer"),
        ({"carveout": {"pci": "0000:00:04.0", "base": "zz"}}, "carveout.base"),
        ({"devices": "rng"}, "devices"),
        ({"poll_interval": 5}, "poll_interval"),
    ],
)
def test_config_errors_name_the_field(change: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_config({**GOOD, **change}, "service.json")


# -- image helpers --------------------------------------------------------------------------

APT_DEPENDS = """\
libpython3.11-stdlib:arm64
  Depends: libpython3.11-minimal:arm64
 |Depends: <media-types:arm64>
    media-types
  Depends: <mime-support:arm64>
    mime-support
  Depends: libbz2-1.0:arm64
 |Depends: <libfoo-virtual:arm64>
    libfoo1:arm64
  Depends: libbar1:arm64
libc6:arm64
  Depends: libgcc-s1:arm64
"""


def test_parse_depends_takes_first_usable_alternative_and_skips_exclusions() -> None:
    deps = pc.parse_depends(APT_DEPENDS)
    assert deps["libpython3.11-stdlib:arm64"] == [
        "libpython3.11-minimal:arm64", "libbz2-1.0:arm64", "libfoo1:arm64",
    ]  # fmt: skip
    assert deps["libc6:arm64"] == ["libgcc-s1:arm64"]


def test_merged_usr_paths() -> None:
    assert _guest("/lib/ld-linux-aarch64.so.1") == "usr/lib/ld-linux-aarch64.so.1"
    assert _guest("/lib/aarch64-linux-gnu/libc.so.6") == "usr/lib/aarch64-linux-gnu/libc.so.6"
    assert _guest("/usr/bin/python3.11") == "usr/bin/python3.11"
    assert _guest("/lib") == "usr/lib"
    assert _guest("/etc/x") == "etc/x"


def test_pyc_is_an_unchecked_hash_pyc_that_runs() -> None:
    src = b"VALUE = 6 * 7\n"
    data = pc.pyc(src, "/usr/lib/x.py")
    assert data is not None and data[:4] == importlib.util.MAGIC_NUMBER
    assert int.from_bytes(data[4:8], "little") == 1  # hash-based, unchecked
    assert data[8:16] == importlib.util.source_hash(src)
    ns: dict = {}
    exec(marshal.loads(data[16:]), ns)
    assert ns["VALUE"] == 42
    assert pc.pyc(b"def (:\n", "/bad.py") is None
    assert pc.pyc_path("usr/lib/a/b.py").endswith("usr/lib/a/__pycache__/b.cpython-311.pyc")


def test_extension_sources_are_read_from_setup_py(tmp_path: Path) -> None:
    srcs = pc.extension_sources(PROJECT_ROOT / "setup.py", "edgevirt.backend.virtq._ring")
    assert srcs and all(s.suffix == ".c" and s.exists() for s in srcs)
    (tmp_path / "setup.py").write_text("setup()\n")
    with pytest.raises(Exception, match="no Extension"):
        pc.extension_sources(tmp_path / "setup.py", "x")


def test_peer_mode_restart_bumps_the_epoch_skips_stale_messages_and_rings_the_driver(
    tmp_path: Path,
) -> None:
    dev = fake_pci(tmp_path, "0000:00:05.0", 64 << 10)
    link = PciDoorbellLink("0000:00:05.0", 2, sysfs=tmp_path)
    first = MsgBus([RngDevice()], GuestMemory(), Loop(), link=link)
    drv_map = mmap.mmap(os.open(dev / "resource2_wc", os.O_RDWR), 64 << 10)
    drv = MessageMemory.attach(memoryview(drv_map))
    try:
        assert drv.epoch == first.msgmem.epoch == 1
        # the driver negotiates with the first device side, which then dies
        drv.to_device.put(p.encode(p.request(MsgId.SET_DEVICE_STATUS, 0, 1, status=1)))
        first.poll()
        assert first.devices[0].status == 1
        assert p.decode(drv.to_driver.get() or b"").token == 1
        first.close()
        # requests the driver sent meanwhile are for the dead device side
        for token in (2, 3):
            drv.to_device.put(p.encode(p.request(MsgId.GET_DEVICE_STATUS, 0, token)))
        (dev / "resource0").write_bytes(bytes(256))  # clear the doorbell register
        with open(dev / "resource0", "r+b") as f:
            f.write(struct.pack("<III", 0, 0, 1))  # IVPosition 1 again: the same peer
        again = MsgBus([RngDevice()], GuestMemory(), Loop(),
                       link=PciDoorbellLink("0000:00:05.0", 2, sysfs=tmp_path))  # fmt: skip
        try:
            assert again.adopted and drv.epoch == again.msgmem.epoch == 2
            assert again.msgmem.skipped == 2 and again.snapshot()["skipped"] == 2
            # the hello doorbell: driver peer 2, vector 0
            assert struct.unpack_from("<I", (dev / "resource0").read_bytes(), 12)[0] == 2 << 16
            assert again.stats.doorbells_out == 1
            again.poll()
            assert drv.to_driver.get() is None  # the stale requests got no answers
            # the new device side starts clean and answers what the driver sends now
            assert again.devices[0].status == 0
            drv.to_device.put(p.encode(p.request(MsgId.GET_DEVICE_STATUS, 0, 4)))
            again.poll()
            answer = p.decode(drv.to_driver.get() or b"")
            assert (answer.token, answer["status"]) == (4, 0)
        finally:
            again.close()
    finally:
        drv.close()
        drv_map.close()


def test_fresh_layout_over_a_foreign_one_is_still_a_new_epoch() -> None:
    shared = bytearray(64 << 10)
    old = MessageMemory.create(memoryview(shared), 64, device_peer=1)
    old.epoch = 7
    old.close()
    # other geometry: laid out anew, but a driver attached to the old one must notice
    mm, adopted = MessageMemory.adopt_or_create(memoryview(shared), 32, device_peer=1)
    try:
        assert not adopted and mm.epoch == 8 and mm.geometry.nslots == 32
    finally:
        mm.close()
    # insane indices in a layout of ours: laid out anew too (the views are not leaked)
    bad = MessageMemory.create(memoryview(shared), 32, device_peer=1)
    bad.to_device.poke("prod", 1000)
    bad.close()
    mm, adopted = MessageMemory.adopt_or_create(memoryview(shared), 32, device_peer=1)
    try:
        assert not adopted and mm.epoch == 10 and mm.to_device.available() == 0
    finally:
        mm.close()


def test_hypervisor_restarted_peer_gets_the_same_id_and_fresh_doorbells(
    hv: Hypervisor, tmp_path: Path
) -> None:
    fe = ivshmem.connect(str(tmp_path / "fe.sock"), 2)
    svc = ivshmem.connect(str(tmp_path / "svc.sock"), 2)
    try:
        _wait(lambda: _collect(fe, 1))
        svc.close()  # the service VM's QEMU is killed
        ivshmem.ring(fe.eventfds[1][0])  # the front-end rings it meanwhile: nobody listens
        svc = ivshmem.connect(str(tmp_path / "svc.sock"), 2)
        assert svc.id == 1  # the same peer ID as before
        # the front-end was told nothing (no disconnect, no new eventfds) and its doorbell,
        # unchanged, reaches the new peer: the kept eventfds (one ring pending from before)
        assert _collect(fe, 1) and len(fe.eventfds[1]) == 2
        ivshmem.ring(fe.eventfds[1][0])
        assert ivshmem.drain(svc.own[0]) == 2
        # and the new peer can ring the front-end, whose eventfds did not change
        ivshmem.ring(svc.eventfds[2][0])
        assert ivshmem.drain(fe.own[0]) == 1
        # the shared memory is the same file: what the old peer wrote is still there
        a = mmap.mmap(fe.shm_fd, 4096)
        b = mmap.mmap(svc.shm_fd, 4096)
        a[:4] = b"VMSG"
        assert b[:4] == b"VMSG"
        a.close()
        b.close()

        def service() -> tuple:
            s = json.loads((tmp_path / "state.json").read_text())["peers"]["service"]
            return s["id"], s["connections"], s["detaches"], s["attached"]

        try:
            _wait(lambda: service() == (1, 2, 1, True))  # the state file follows the attach
        except AssertionError:
            raise AssertionError(service()) from None
    finally:
        svc.close()
        fe.close()
