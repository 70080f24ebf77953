"""End to end: the guest's virtio-net (and vsock) served by the edgevirt back-end over
vhost-user, QEMU 7.2 front-ends (``-netdev vhost-user`` + ``virtio-net-device``,
``vhost-user-vsock-device``), carve-out topology with the restricted pool.

The network peer is a TAP inside a network namespace this test creates (nothing touches the
host's own network): the guest pings it and moves data both ways over TCP with sha256
checked at the far end.
"""

import contextlib
import hashlib
import json
import os
import re
import secrets
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from edgevirt.board import load_board
from edgevirt.console.expect import Console
from edgevirt.deploy.machine import mmio_nodes
from edgevirt.deploy.qemu import QemuConfig, VhostUserDevice, wait_for_path
from edgevirt.devsmoke.net import GUEST_IP, PEER_IP, in_netns, ns_peer
from edgevirt.image.kernel import build_kernel
from edgevirt.report import Reporter
from edgevirt.up import BackendProcess, backend_socket, build_initramfs, compose_dtb

pytestmark = pytest.mark.e2e

NET_MIB = 32


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


@pytest.fixture
def netns():
    if os.geteuid() != 0:
        pytest.skip("needs root: a network namespace and a TAP")
    name = f"evtest{os.getpid()}{secrets.token_hex(2)}"
    sh("ip", "netns", "add", name)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


@contextlib.contextmanager
def booted(tmp_path, backend_devices, qemu_devices):
    """The back-end serving ``backend_devices``, QEMU with ``qemu_devices`` (VhostUserDevice
    whose socket is filled in here, in order), booted to the agent. Yields (console, be)."""
    board = load_board("qemu-virt")
    build = tmp_path / "build"
    build.mkdir()
    shm = Path("/dev/shm") / f"edgevirt-{os.getpid()}-{secrets.token_hex(4)}"
    sock_dir = build / "sockets"
    sock_dir.mkdir()
    for i, (spec, qdev) in enumerate(zip(backend_devices, qemu_devices, strict=True)):
        qdev.socket = backend_socket(sock_dir, i, spec.partition(":")[0])
    qcfg = QemuConfig(board.qemu, shm, list(qemu_devices))
    kb = build_kernel(None)
    initrd = build_initramfs(build / "initramfs.cpio.gz", Reporter())
    dtb = compose_dtb(board, qcfg, build, True, mmio_nodes(len(qemu_devices)))
    qcfg.kernel, qcfg.initrd, qcfg.dtb = kb.image, initrd, dtb
    qcfg.console_socket = build / "console.sock"
    qcfg.append = f"console={board.console_kernel} panic=-1"
    be = BackendProcess(list(backend_devices), sock_dir, build / "stats.json",
                        build / "backend.log")  # fmt: skip
    qemu = qemu_log = console = None
    try:
        be.wait_ready()
        qemu_log = open(build / "qemu.log", "wb")
        qemu = subprocess.Popen(qcfg.command(), stdin=subprocess.DEVNULL, stdout=qemu_log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        wait_for_path(qcfg.console_socket, 30, "QEMU console socket")
        console = Console.open(f"unix://{qcfg.console_socket}", log_path=build / "console.log")
        console.expect(rb"EDGEVIRT-AGENT-READY[^\n]*\n", 120)
        yield console, be
        console.sendline("poweroff -f")
        assert qemu.wait(30) is not None
        stats = be.stats()["devices"]
        assert all(d["broken"] == [] and d["refused"] == 0 for d in stats), stats
    finally:
        if console is not None:
            console.close()
        if qemu is not None and qemu.poll() is None:
            os.killpg(qemu.pid, 9)
            qemu.wait()
        if qemu_log is not None:
            qemu_log.close()
        be.stop()
        shm.unlink(missing_ok=True)


def sha(output: str) -> str:
    m = re.search(r"\b[0-9a-f]{64}\b", output)
    assert m, output
    return m.group(0)


def device_features(console, device_id: int) -> str:
    r = console.run(
        "for d in /sys/bus/virtio/devices/*; do "
        f"[ $(cat $d/device) = {device_id:#06x} ] && cat $d/features; done; true", 10)  # fmt: skip
    assert r.status == 0 and len(r.output.strip()) >= 34, r.output
    feats = r.output.strip()
    assert feats[32] == "1" and feats[33] == "1", f"VERSION_1/ACCESS_PLATFORM missing: {feats}"
    return feats  # sysfs lists bit 0 first


def test_net_guest_pings_and_moves_data_through_tap_in_netns(tmp_path, netns):
    tap = "evtap0"
    qdev = VhostUserDevice("virtio-net-device", Path(), "vn0", {"mac": "52:54:00:12:34:56"})
    ns_ready = False
    with booted(tmp_path, [f"net:tap={tap},netns={netns}"], [qdev]) as (console, be):
        for cmd in (["addr", "add", f"{PEER_IP}/24", "dev", tap], ["link", "set", tap, "up"],
                    ["link", "set", "lo", "up"]):  # fmt: skip
            sh(*in_netns(netns, "ip"), *cmd)
        ns_ready = True
        feats = device_features(console, 1)
        assert feats[15] == feats[5] == feats[16] == "1", f"MRG_RXBUF/MAC/STATUS missing: {feats}"
        r = console.run(f"ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0 && "
                        f"ping -c 3 -W 5 {PEER_IP}", 40)  # fmt: skip
        assert r.status == 0 and "3 packets received" in r.output, r.output
        # 64-byte frames (18 bytes of ICMP payload) and MTU-sized ones (1500-byte packets).
        for size in (18, 1472):
            r = console.run(f"ping -c 2 -W 5 -s {size} {PEER_IP}", 30)
            assert r.status == 0 and "2 packets received" in r.output, r.output
        size = NET_MIB << 20
        # guest → namespace
        srv = ns_peer(netns, "recv", PEER_IP, "5000", str(size))
        assert srv.stdout is not None and srv.stdout.readline().strip() == "listening"
        t0 = time.monotonic()
        r = console.run(f"dd if=/dev/urandom of=/tmp/out bs=1M count={NET_MIB} 2>/dev/null && "
                        f"sha256sum /tmp/out && nc {PEER_IP} 5000 < /tmp/out", 240)  # fmt: skip
        assert r.status == 0, r.output
        sent_sha = r.output.split()[0]
        out, err = srv.communicate(timeout=60)
        _, n, got_sha = out.split()  # got N SHA256 (edgevirt.devpeer)
        assert int(n) == size and got_sha == sent_sha, (out, err)
        t1 = time.monotonic()
        # namespace → guest
        # The guest listens in the foreground (busybox ash as PID 1 exits when a background
        # job ends while it reads a command line); the sender retries until it is up.
        snd = ns_peer(netns, "send", GUEST_IP, "5001", str(size))
        r = console.run("nc -l -p 5001 > /tmp/in; sha256sum /tmp/in", 240)
        out, err = snd.communicate(timeout=60)
        assert snd.returncode == 0, err
        _, n, want = out.split()  # sent N SHA256
        assert r.status == 0 and sha(r.output) == want, r.output
        t2 = time.monotonic()
        stats = be.stats()["devices"][0]
        # Both ways at least the payload (TSO: a frame carries up to 64 KiB of it).
        assert stats["bytes_read"] > size and stats["bytes_written"] > size, stats
        assert stats["errors"] == 0, stats["by_type"]
        print(json.dumps({"out_s_incl_dd": t1 - t0, "in_s": t2 - t1, "net": stats["by_type"]}))
    assert ns_ready


VSOCK_MIB = 8
GUEST_CID = 3


def test_vsock_streams_both_ways_to_unix_sockets(tmp_path):
    vdir = tmp_path / "vsock"
    vdir.mkdir()
    size = VSOCK_MIB << 20
    reply = os.urandom(size)
    got: dict[str, str] = {}

    def host_server(srv: socket.socket) -> None:
        c, _ = srv.accept()
        h, n = hashlib.sha256(), 0
        while True:
            b = c.recv(1 << 16)
            if not b:
                break
            h.update(b)
            n += len(b)
        got["from_guest"] = f"{n} {h.hexdigest()}"
        c.sendall(reply)
        c.close()

    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(vdir / "vsock_5000"))
    srv.listen(1)
    t = threading.Thread(target=host_server, args=(srv,), daemon=True)
    t.start()
    qdev = VhostUserDevice("vhost-user-vsock-device", Path(), "vv0")
    with booted(tmp_path, [f"vsock:cid={GUEST_CID},dir={vdir}"], [qdev]) as (console, be):
        device_features(console, 19)
        # guest → host and back on one connection the guest opens
        r = console.run(f"dd if=/dev/urandom of=/tmp/vout bs=1M count={VSOCK_MIB} 2>/dev/null"
                        " && sha256sum /tmp/vout && ev-vsock connect 2 5000 < /tmp/vout > "
                        "/tmp/vin && sha256sum /tmp/vin", 120)  # fmt: skip
        assert r.status == 0, r.output
        sums = r.output.split()
        t.join(10)
        assert got["from_guest"] == f"{size} {sums[0]}"
        assert sums[2] == hashlib.sha256(reply).hexdigest()
        # a port nobody listens on: RST, connect() fails with ECONNRESET
        r = console.run("ev-vsock connect 2 5999 < /dev/null", 20)
        assert r.status == 1 and "connect: errno 104" in r.output, r.output
        # a connection the host side opens to a guest listener (in the foreground: see the
        # net test); the host retries CONNECT until the guest listens (RST closes it)
        host_got: dict[str, bytes] = {}

        def host_opens() -> None:
            for _ in range(300):
                h = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                h.settimeout(30)
                h.connect(str(vdir / "vsock"))
                h.sendall(b"CONNECT 6000\n")
                line = h.recv(64)
                if line.startswith(b"OK "):
                    break
                h.close()
                time.sleep(0.1)
            else:
                return
            host_got["line"] = line
            h.sendall(reply)
            h.shutdown(socket.SHUT_WR)
            host_got["rest"] = h.recv(64)  # the guest sends nothing and closes
            h.close()

        ht = threading.Thread(target=host_opens, daemon=True)
        ht.start()
        r = console.run("ev-vsock listen 6000 < /dev/null > /tmp/hin; sha256sum /tmp/hin", 60)
        ht.join(30)
        assert r.status == 0 and sha(r.output) == hashlib.sha256(reply).hexdigest(), r.output
        assert host_got["line"].endswith(b"\n") and host_got["rest"] == b"", host_got
        stats = be.stats()["devices"][0]
        print(json.dumps({"vsock": stats["by_type"], "state": stats.get("state")}))
        assert stats["by_type"]["request_no_listener"] == 1


# -- over virtio-msg: the three devices behind one bus, one boot --------------------------


def test_net_vsock_console_over_virtio_msg(tmp_path, netns):
    from edgevirt.deploy.backend_process import IvshmemBus
    from edgevirt.deploy.qemu import QemuProcess
    from edgevirt.msgup import prepare_guest

    board = load_board("qemu-virt")
    s = board.qemu
    build = tmp_path / "build"
    build.mkdir()
    vdir, cdir = tmp_path / "vsock", tmp_path / "console"
    vdir.mkdir()
    cdir.mkdir()
    shm = Path("/dev/shm") / f"edgevirt-{os.getpid()}-{secrets.token_hex(4)}"
    with open(shm, "wb") as f:
        f.truncate(s.carveout)
    qcfg = QemuConfig(s, shm)
    qcfg.ivshmem_socket = build / "ivshmem.sock"
    prepare_guest(qcfg, build, Reporter(), devices=("net", "vsock", "console"))
    qcfg.append = f"console={board.console_kernel} panic=-1"
    tap = "evtap1"
    devices = [f"net:tap={tap},netns={netns}", f"vsock:cid={GUEST_CID},dir={vdir}",
               f"console:ports=log!+ctl,dir={cdir}"]  # fmt: skip
    be = BackendProcess(devices, None, build / "stats.json", build / "backend.log",
                        msg=IvshmemBus(qcfg.ivshmem_socket, shm, s.carveout_base))  # fmt: skip
    qemu = console = None
    vsrv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    vsrv.bind(str(vdir / "vsock_5000"))
    vsrv.listen(1)
    vsrv.settimeout(60)
    try:
        be.wait_ready()
        for cmd in (["addr", "add", f"{PEER_IP}/24", "dev", tap], ["link", "set", tap, "up"]):
            sh(*in_netns(netns, "ip"), *cmd)
        qemu = QemuProcess(qcfg, build / "qemu.log")
        wait_for_path(qcfg.console_socket, 30, "console", qemu)
        console = Console.open(f"unix://{qcfg.console_socket}", log_path=build / "console.log")
        console.expect(rb"EDGEVIRT-AGENT-READY[^\n]*\n", 120, qemu.check_alive)
        for dev_id in (1, 19, 3):
            device_features(console, dev_id)
        # -- net: ping, then 32 MiB each way
        r = console.run(f"ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0 && "
                        f"ping -c 3 -W 5 {PEER_IP} && ping -c 2 -W 5 -s 1472 {PEER_IP}",
                        60)  # fmt: skip
        assert r.status == 0 and "2 packets received" in r.output, r.output
        size = NET_MIB << 20
        srv = ns_peer(netns, "recv", PEER_IP, "5000", str(size))
        assert srv.stdout is not None and srv.stdout.readline().strip() == "listening"
        r = console.run(f"dd if=/dev/urandom of=/tmp/out bs=1M count={NET_MIB} 2>/dev/null && "
                        f"sha256sum /tmp/out && nc {PEER_IP} 5000 < /tmp/out", 240)  # fmt: skip
        assert r.status == 0, r.output
        out, err = srv.communicate(timeout=60)
        assert out.split() == ["got", str(size), sha(r.output)], (out, err)
        snd = ns_peer(netns, "send", GUEST_IP, "5001", str(size))
        r = console.run("rm /tmp/out; nc -l -p 5001 > /tmp/in; sha256sum /tmp/in; rm /tmp/in",
                        240)  # fmt: skip
        out, err = snd.communicate(timeout=60)
        assert snd.returncode == 0 and sha(r.output) == out.split()[2], (r.output, out, err)
        # -- vsock: the guest's stream to a host unix socket, 8 MiB there and back
        got: dict[str, str] = {}

        def vserve() -> None:
            c, _ = vsrv.accept()
            buf = b""
            while True:
                b = c.recv(1 << 16)
                if not b:
                    break
                buf += b
            got["sha"] = hashlib.sha256(buf).hexdigest()
            c.sendall(buf)  # echo: the guest checks what came back
            c.close()

        t = threading.Thread(target=vserve, daemon=True)
        t.start()
        r = console.run(f"dd if=/dev/urandom of=/tmp/v bs=1M count={VSOCK_MIB} 2>/dev/null && "
                        "ev-vsock connect 2 5000 < /tmp/v > /tmp/vr && sha256sum /tmp/v /tmp/vr"
                        " && rm /tmp/v /tmp/vr", 120)  # fmt: skip
        assert r.status == 0, r.output
        sums = re.findall(r"\b[0-9a-f]{64}\b", r.output)
        t.join(10)
        assert len(sums) == 2 and sums[0] == sums[1] == got["sha"], (r.output, got)
        r = console.run("ev-vsock connect 2 5999 < /dev/null", 20)
        assert r.status == 1 and "connect: errno 104" in r.output, r.output
        # -- console: named ports appear, bytes both ways, the console port is hvc0
        r = console.run("for p in /sys/class/virtio-ports/*; do echo $(basename $p) "
                        "$(cat $p/name); done", 10)  # fmt: skip
        ports = dict(line.split()[::-1] for line in r.output.splitlines() if line.strip())
        assert set(ports) == {"log", "ctl"}, r.output
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(30)

        def client_later() -> None:  # after the guest is already blocked reading the port
            time.sleep(2)
            c.connect(str(cdir / "ctl.sock"))
            c.sendall(b"from-host-12")

        ct = threading.Thread(target=client_later, daemon=True)
        ct.start()
        r = console.run(f"dd if=/dev/{ports['ctl']} bs=1 count=12 2>/dev/null", 30)
        ct.join(10)
        assert "from-host-12" in r.output, r.output
        r = console.run("dd if=/dev/urandom of=/tmp/c bs=1k count=256 2>/dev/null && "
                        f"sha256sum /tmp/c && cat /tmp/c > /dev/{ports['ctl']}", 60)  # fmt: skip
        assert r.status == 0, r.output
        got = b""
        while len(got) < 256 << 10:
            got += c.recv(1 << 16)
        assert hashlib.sha256(got).hexdigest() == sha(r.output)
        assert (cdir / "ctl.log").read_bytes() == got
        r = console.run("echo hvc-says-hello > /dev/hvc0", 20)
        assert r.status == 0, r.output
        assert b"hvc-says-hello\r\n" in (cdir / "log.log").read_bytes()  # a tty: onlcr
        console.sendline("poweroff -f")
        qemu.wait(30)
        st = be.stats()
        assert st["protocol_errors"] == 0, st["errors"]
        for d in st["devices"]:
            assert d["broken"] == [] and d["refused"] == 0, d
    finally:
        if console is not None:
            console.close()
        if qemu is not None:
            qemu.stop()
        be.stop()
        vsrv.close()
        shm.unlink(missing_ok=True)


def test_net_backend_killed_and_restarted_guest_pings_again(tmp_path, netns):
    """vhost-user reconnect: SIGKILL the back-end under a running guest, start a new one;
    QEMU (chardev reconnect=1) hands it the rings again and the guest's NIC works on. The
    TAP is persistent (made by the test), so it and its address outlive the back-end."""
    import signal

    tap = "evtap2"
    sh(*in_netns(netns, "ip"), "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr")
    for cmd in (["addr", "add", f"{PEER_IP}/24", "dev", tap], ["link", "set", tap, "up"]):
        sh(*in_netns(netns, "ip"), *cmd)
    qdev = VhostUserDevice("virtio-net-device", Path(), "vn0", {"mac": "52:54:00:12:34:56"},
                           {"reconnect": "1"})  # fmt: skip
    spec = f"net:tap={tap},netns={netns}"
    with booted(tmp_path, [spec], [qdev]) as (console, be):
        r = console.run(f"ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0 && "
                        f"ping -c 2 -W 5 {PEER_IP}", 40)  # fmt: skip
        assert r.status == 0 and "2 packets received" in r.output, r.output
        os.killpg(be.proc.pid, signal.SIGKILL)
        be.proc.wait(10)
        time.sleep(0.5)
        build = tmp_path / "build"
        second = BackendProcess([spec], build / "sockets", build / "stats2.json",
                                build / "backend2.log")  # fmt: skip
        try:
            second.wait_ready()
            # QEMU retries every second; the first pings may fall in the gap.
            r = console.run(f"for i in 1 2 3 4 5 6 7 8 9 10; do ping -c 1 -W 2 {PEER_IP} && "
                            "break; done", 60)  # fmt: skip
            assert r.status == 0 and "1 packets received" in r.output, r.output
            deadline = time.monotonic() + 10
            while not second.stats().get("devices", [{}])[0].get("connections"):
                assert time.monotonic() < deadline
                time.sleep(0.1)
            st = second.stats()["devices"][0]
            assert st["broken"] == [] and st["by_type"].get("rx_frames", 0) > 0, st
        finally:
            second.stop()
