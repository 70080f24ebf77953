"""In-guest network and vsock throughput: edgevirt's virtio-net beside QEMU's built-in one.

One guest (TCG, carve-out restricted), two NICs in the same boot: ``eth(edgevirt)`` is
``-netdev vhost-user`` served by ``edgevirt backend run --device net:tap=…`` with its TAP in
network namespace A; ``eth(qemu)`` is QEMU's own ``virtio-net-device`` on a TAP in namespace
B (opened here, handed to QEMU as ``-netdev tap,fd=N,vhost=off``, offloads as QEMU
negotiates them). Each namespace has a Python peer. TCP guest → peer and peer → guest,
32 MiB per transfer, alternated between the NICs and repeated; throughput is measured at
the peer (first byte to last byte received, or connect to close for sending); medians and
the edgevirt/QEMU ratio are reported. vsock: guest → host unix socket and back through
edgevirt's vhost-user-vsock (the host kernel's ``vhost-vsock`` is compared when
``/dev/vhost-vsock`` exists; on this machine it does not).

:func:`backend_only` measures the back-end without a guest (synthetic vhost-user front-end,
datagram link): what it costs per frame, to tell whether the device needs a C path.

Run: ``.venv/bin/python -m bench.net`` (root: it makes network namespaces);
``--backend-only`` for the guest-less figure alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from edgevirt.backend.devices.tap import Tap
from edgevirt.board import load_board
from edgevirt.console.expect import Console
from edgevirt.deploy.backend_process import BackendProcess, backend_socket
from edgevirt.deploy.machine import build_initramfs, compose_dtb, mmio_nodes
from edgevirt.deploy.qemu import QemuConfig, VhostUserDevice, wait_for_path
from edgevirt.devsmoke.net import in_netns
from edgevirt.image.kernel import build_kernel
from edgevirt.report import Reporter

MIB = 1 << 20
SIZE = 32 * MIB
REPEAT = 3
EV_MAC, Q_MAC = "52:54:00:12:34:56", "52:54:00:12:34:99"
NETS = {"edgevirt": ("10.0.2.1", "10.0.2.15"), "qemu": ("10.0.4.1", "10.0.4.15")}

PEER = r"""
import socket, sys, time
mode, host, port, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if mode == "recv":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port)); s.listen(1); print("listening", flush=True)
    c, _ = s.accept(); n = 0; t0 = None
    while n < size:
        b = c.recv(1 << 16)
        if not b: break
        if t0 is None: t0 = time.monotonic()
        n += len(b)
    t1 = time.monotonic(); c.close(); print(n, t1 - t0, flush=True)
else:
    data = bytes(size)
    for _ in range(600):
        try:
            c = socket.create_connection((host, port), timeout=5); break
        except OSError:
            time.sleep(0.05)
    c.settimeout(300); t0 = time.monotonic(); c.sendall(data); c.shutdown(socket.SHUT_WR)
    c.recv(1); c.close()
    print(size, time.monotonic() - t0, flush=True)
"""


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


def peer(ns: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(in_netns(ns, sys.executable, "-c", PEER, *args),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


@contextlib.contextmanager
def drained(peer: socket.socket) -> Iterator[None]:
    """A thread that reads and drops what ``peer`` receives while the block runs (the link's
    far end for transmit-only measurements)."""
    stop = threading.Event()

    def drain() -> None:
        peer.settimeout(0.2)
        while not stop.is_set():
            try:
                peer.recv(70000)
            except OSError:
                pass

    d = threading.Thread(target=drain, daemon=True)
    d.start()
    try:
        yield
    finally:
        stop.set()
        d.join(2)


def mib_s(out: str) -> float:
    n, secs = out.split()
    return int(n) / MIB / float(secs)


class NetBenchConfig(QemuConfig):
    extra: tuple[str, ...] = ()

    def device_args(self) -> list[str]:
        return super().device_args() + list(self.extra)


def run(build: Path | None = None) -> dict:
    build = build or Path(tempfile.mkdtemp(prefix="edgevirt-bench-net-"))
    board = load_board("qemu-virt")
    tag = f"{os.getpid()}{secrets.token_hex(2)}"
    ns = {"edgevirt": f"evbA{tag}", "qemu": f"evbB{tag}"}
    for n in ns.values():
        sh("ip", "netns", "add", n)
    shm = Path("/dev/shm") / f"edgevirt-bench-{tag}"
    sock_dir = build / "sockets"
    sock_dir.mkdir(parents=True, exist_ok=True)
    vdir = build / "vsock"
    vdir.mkdir(exist_ok=True)
    qtap = Tap("evqtap0", ns["qemu"])
    be = qemu = console = None
    try:
        devices = [f"net:tap=evtap0,netns={ns['edgevirt']},mac={EV_MAC}",
                   f"vsock:cid=3,dir={vdir}"]  # fmt: skip
        qdevs = [
            VhostUserDevice("virtio-net-device", backend_socket(sock_dir, 0, "net"), "vn0",
                            {"mac": EV_MAC}),
            VhostUserDevice("vhost-user-vsock-device", backend_socket(sock_dir, 1, "vsock"),
                            "vv0"),
        ]  # fmt: skip
        qcfg = NetBenchConfig(board.qemu, shm, qdevs)
        qcfg.extra = (
            "-netdev",
            f"tap,id=qn0,fd={qtap.fd},vhost=off",
            "-device",
            f"virtio-net-device,netdev=qn0,mac={Q_MAC},iommu_platform=on",
        )
        kb = build_kernel(None)
        initrd = build_initramfs(build / "initramfs.cpio.gz", Reporter())
        qcfg.kernel, qcfg.initrd = kb.image, initrd
        qcfg.dtb = compose_dtb(board, qcfg, build, True, mmio_nodes(3))
        qcfg.console_socket = build / "console.sock"
        qcfg.append = f"console={board.console_kernel} panic=-1"
        be = BackendProcess(devices, sock_dir, build / "stats.json", build / "backend.log")
        be.wait_ready()
        for name, tap in (("edgevirt", "evtap0"), ("qemu", "evqtap0")):
            ip = NETS[name][0]
            for cmd in (["addr", "add", f"{ip}/24", "dev", tap], ["link", "set", tap, "up"]):
                sh(*in_netns(ns[name], "ip", *cmd))
        os.set_inheritable(qtap.fd, True)
        log = open(build / "qemu.log", "wb")  # noqa: SIM115
        qemu = subprocess.Popen(qcfg.command(), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                pass_fds=(qtap.fd,))  # fmt: skip
        wait_for_path(qcfg.console_socket, 30, "QEMU console socket")
        console = Console.open(f"unix://{qcfg.console_socket}", log_path=build / "console.log")
        console.expect(rb"EDGEVIRT-AGENT-READY[^\n]*\n", 120)
        ifaces = {}
        r = console.run("for i in /sys/class/net/eth*; do echo $(basename $i) "
                        "$(cat $i/address); done", 10)  # fmt: skip
        for line in r.output.splitlines():
            if line.strip():
                dev, mac = line.split()
                ifaces[{EV_MAC: "edgevirt", Q_MAC: "qemu"}[mac]] = dev
        for name, dev in ifaces.items():
            r = console.run(f"ip link set {dev} up && ip addr add {NETS[name][1]}/24 dev {dev}"
                            f" && ping -c 1 -W 5 {NETS[name][0]}", 30)  # fmt: skip
            if r.status != 0:
                raise RuntimeError(f"{name} NIC: {r.output}")
        console.run(f"dd if=/dev/zero of=/tmp/out bs=1M count={SIZE // MIB} 2>/dev/null", 60)
        res: dict[str, dict[str, list[float]]] = {n: {"out": [], "in": []} for n in NETS}
        for _ in range(REPEAT):
            for name in NETS:
                peer_ip, guest_ip = NETS[name]
                p = peer(ns[name], "recv", peer_ip, "5000", str(SIZE))
                assert p.stdout is not None and p.stdout.readline().strip() == "listening"
                console.run(f"nc {peer_ip} 5000 < /tmp/out", 300)
                res[name]["out"].append(mib_s(p.communicate(timeout=60)[0]))
                p = peer(ns[name], "send", guest_ip, "5001", str(SIZE))
                console.run("nc -l -p 5001 > /dev/null", 300)
                res[name]["in"].append(mib_s(p.communicate(timeout=60)[0]))
        out = {"net": {}, "vsock": {}}
        for d in ("out", "in"):
            ev, q = statistics.median(res["edgevirt"][d]), statistics.median(res["qemu"][d])
            out["net"][d] = {"edgevirt_mib_s": round(ev, 2), "qemu_mib_s": round(q, 2),
                             "ratio": round(ev / q, 2), "samples": res}  # fmt: skip
        out["vsock"] = vsock_bench(console, vdir)
        out["vsock"]["vhost_vsock"] = (
            "compared"
            if os.path.exists("/dev/vhost-vsock")
            else "not available on this host (/dev/vhost-vsock)"
        )
        console.sendline("poweroff -f")
        qemu.wait(30)
        out["backend"] = be.stats()
        return out
    finally:
        if console is not None:
            console.close()
        if qemu is not None and qemu.poll() is None:
            os.killpg(qemu.pid, 9)
            qemu.wait()
        if be is not None:
            be.stop()
        qtap.close()
        for n in ns.values():
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
        shm.unlink(missing_ok=True)


def vsock_bench(console: Console, vdir: Path) -> dict:
    """32 MiB guest → host unix socket through edgevirt vsock (host measures), REPEAT times."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = vdir / "vsock_7000"
    path.unlink(missing_ok=True)
    srv.bind(str(path))
    srv.listen(1)
    rates = []
    for _ in range(REPEAT):
        got: dict[str, float] = {}

        def serve(got: dict[str, float] = got) -> None:
            c, _ = srv.accept()
            n, t0 = 0, None
            while True:
                b = c.recv(1 << 16)
                if not b:
                    break
                t0 = t0 or time.monotonic()
                n += len(b)
            got["rate"] = n / MIB / (time.monotonic() - (t0 or time.monotonic()))
            c.close()

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        console.run("ev-vsock connect 2 7000 < /tmp/out > /dev/null", 300)
        t.join(60)
        rates.append(got.get("rate", 0.0))
    srv.close()
    return {"guest_to_host_mib_s": round(statistics.median(rates), 2), "samples": rates}


def backend_only(frame: int = 1514, rounds: int = 200, batch: int = 64) -> dict:
    """The back-end's own cost per frame, no guest: the synthetic vhost-user front-end
    (rings in a memfd, eventfd kicks) and a datagram link whose far end a thread drains or
    fills. Returns frames/s and MiB/s for transmit and receive."""
    from edgevirt.backend.devices.net import NetDevice
    from edgevirt.backend.devices.tap import DatagramLink
    from edgevirt.backend.loop import Loop
    from edgevirt.backend.transport.vhost_user.backend import VhostUserBackend
    from edgevirt.backend.transport.vhost_user.frontend import VhostUserFrontend

    base = 0x5C000000
    out: dict = {"frame_bytes": frame}
    with tempfile.TemporaryDirectory() as tmp:
        loop = Loop()
        link = DatagramLink()
        link.peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        dev = NetDevice(link, offload=False)
        be = VhostUserBackend(dev, f"{tmp}/net.sock", loop)
        t = threading.Thread(target=loop.run, daemon=True)
        t.start()
        fe = VhostUserFrontend(be.path, size=16 * MIB)
        fe.negotiate(1 << 15)
        fe.set_mem_table()
        rx = fe.setup_vring(0, 256, base=base)
        rx.driver.data_end = base + 8 * MIB
        tx = fe.setup_vring(1, 256, base=base + 8 * MIB)
        pkt = bytes(12) + bytes(frame)
        with drained(link.peer):
            t0 = time.perf_counter()
            for _ in range(rounds):
                tx.driver.reset_data()
                for _ in range(batch):
                    tx.driver.add([pkt])
                fe.kick(1)
                got = 0
                while got < batch:
                    fe.wait_call(1, 5)
                    got += len(tx.driver.get_used())
            secs = time.perf_counter() - t0
        n = rounds * batch
        out["tx_frames_s"] = round(n / secs)
        out["tx_mib_s"] = round(n * frame / MIB / secs, 1)
        t0 = time.perf_counter()
        for _ in range(rounds):
            rx.driver.reset_data()
            for _ in range(batch):
                rx.driver.add([], [frame + 12])
            fe.kick(0)
            for _ in range(batch):
                link.peer.send(pkt)
            got = 0
            while got < batch:
                fe.wait_call(0, 5)
                got += len(rx.driver.get_used())
        secs = time.perf_counter() - t0
        out["rx_frames_s"] = round(n / secs)
        out["rx_mib_s"] = round(n * frame / MIB / secs, 1)
        loop.stop()
        t.join(5)
        fe.close()
        be.close()
    return out


def device_cost(frames: int = 50000) -> dict:
    """Microseconds the net device spends per 1514-byte transmit frame (header check +
    ``writev`` into a datagram link that a thread drains), without any ring or transport."""
    from edgevirt.backend.devices.base import Chain
    from edgevirt.backend.devices.net import NetDevice
    from edgevirt.backend.devices.tap import DatagramLink
    from edgevirt.backend.memory import GuestMemory, memfd_region

    fd, region = memfd_region(0x5C000000, 1 << 20)
    mem = GuestMemory([region])
    link = DatagramLink()
    link.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    dev = NetDevice(link, offload=False)
    chain = Chain(0, [(0x5C000000, 12), (0x5C000100, 1514)], [])
    with drained(link.peer):
        t0 = time.perf_counter()
        for _ in range(frames):
            dev._transmit(chain, mem)
        secs = time.perf_counter() - t0
    sent = dev.stats.by_type.get("tx_frames", 0)
    link.close()
    mem.close()
    os.close(fd)
    return {"tx_us_per_frame": round(secs / frames * 1e6, 2), "frames_sent": sent,
            "frames_dropped_link_full": frames - sent}  # fmt: skip


def main() -> None:
    if "--backend-only" in sys.argv:
        print(json.dumps({"synthetic": backend_only(), "device": device_cost()}, indent=2))
        return
    r = run()
    r.pop("backend", None)
    r["backend_only"] = {"synthetic": backend_only(), "device": device_cost()}
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
