"""net, vsock and console with the back-end in the service VM (virtio-msg over ivshmem).

The service VM runs the same device code in peer mode; its TAP lives in the service VM, so
the front-end's NIC reaches the service VM's own network stack (the way a service VM that
owns the car's Ethernet would route it); vsock's host side (CID 2) and the console ports are
unix sockets inside the service VM. Programs on the service VM side are Python one-liners
(its rootfs has Debian's python3), run on its console.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
from pathlib import Path

import pytest

from edgevirt.board import load_board
from edgevirt.console.expect import Console
from edgevirt.deploy.qemu import QemuConfig, QemuProcess, wait_for_path
from edgevirt.msgup import prepare_guest
from edgevirt.report import Reporter
from edgevirt.servicevm.image import build_service_image
from edgevirt.servicevm.peer import PeerConfig
from edgevirt.servicevm.up import (
    CARVEOUT_PCI,
    FRONTEND_ID,
    MSG_PCI,
    STATS,
    HypervisorProcess,
    ServiceQemuConfig,
    _boot,
)

pytestmark = pytest.mark.e2e

SVC_IP, FE_IP = "10.0.3.1", "10.0.3.2"
VDIR, CDIR = "/run/edgevirt/vsock", "/run/edgevirt/console"
DEVICES = ["net:tap=ev0", f"vsock:cid=3,dir={VDIR}", f"console:ports=log!+ctl,dir={CDIR}"]
MIB = 1 << 20

# Service-VM side programs: run as python3 -c "exec(bytes.fromhex(...))" (no quoting issues).
RECV_TCP = """
import hashlib, socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{ip}", {port})); s.listen(1); c, _ = s.accept(); h = hashlib.sha256(); n = 0
t0 = None
while n < {size}:
    b = c.recv(65536)
    if not b: break
    t0 = t0 or time.monotonic(); h.update(b); n += len(b)
c.close(); print("GOT", n, h.hexdigest(), "MIB_S %.2f" % (n / 1048576 / (time.monotonic() - t0)))
"""
SEND_TCP = """
import hashlib, os, socket, time
data = os.urandom({size})
for _ in range(600):
    try:
        c = socket.create_connection(("{ip}", {port}), timeout=5); break
    except OSError:
        time.sleep(0.1)
c.settimeout(300); t0 = time.monotonic(); c.sendall(data); c.shutdown(socket.SHUT_WR)
c.recv(1); c.close()  # the peer closes once it has everything: time to the last byte
print("SENT", len(data), hashlib.sha256(data).hexdigest(),
      "MIB_S %.2f" % (len(data) / 1048576 / (time.monotonic() - t0)))
"""
VSOCK_ECHO = """
import hashlib, os, socket
p = "{dir}/vsock_5000"
s = socket.socket(socket.AF_UNIX); s.bind(p); s.listen(1); print("READY", flush=True)
c, _ = s.accept(); buf = b""
while True:
    b = c.recv(65536)
    if not b: break
    buf += b
c.sendall(buf); c.close(); print("ECHO", len(buf), hashlib.sha256(buf).hexdigest())
"""
CONSOLE_READ = """
import hashlib, socket, time
c = socket.socket(socket.AF_UNIX); c.connect("{dir}/ctl.sock"); c.sendall(b"from-service-vm!")
buf = b""
while len(buf) < {size}:
    b = c.recv(65536)
    if not b: break
    buf += b
print("CON", len(buf), hashlib.sha256(buf).hexdigest())
"""


def py(src: str, **kw: object) -> str:
    return f'python3 -c "exec(bytes.fromhex(\'{src.format(**kw).encode().hex()}\'))"'


def sha(output: str) -> str:
    m = re.search(r"\b[0-9a-f]{64}\b", output)
    assert m, output
    return m.group(0)


def in_thread(console: Console, cmd: str, timeout: float) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["r"] = console.run(cmd, timeout)
        except Exception as e:  # reported by the caller's assertion
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_net_vsock_console_served_from_the_service_vm(tmp_path: Path) -> None:
    board = load_board("qemu-virt")
    s = board.qemu
    build = tmp_path / "build"
    svc_dir, fe_dir = build / "service", build / "frontend"
    for d in (svc_dir, fe_dir):
        d.mkdir(parents=True)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    carveout = Path("/dev/shm") / f"edgevirt-svm-carveout-{tag}"
    msgmem = Path("/dev/shm") / f"edgevirt-svm-msg-{tag}"
    cfg = PeerConfig(CARVEOUT_PCI, s.carveout_base, MSG_PCI, FRONTEND_ID,
                     carveout_size=s.carveout, devices=DEVICES, stats=STATS)  # fmt: skip
    image = build_service_image(cfg, Reporter())
    hv = HypervisorProcess(carveout, s.carveout, msgmem, build)
    svc = fe_qemu = fe_con = None
    try:
        hv.wait_ready()
        scfg = ServiceQemuConfig(s, carveout)
        scfg.ivshmem_socket, scfg.disk = hv.sockets["service"], svc_dir / "disk.img"
        scfg.disk.write_bytes(bytes(1 << 20))
        scfg.kernel, scfg.initrd = image.kernel.image, image.rootfs.path
        scfg.append = f"console={board.console_kernel} panic=-1"
        scfg.console_socket = svc_dir / "console.sock"
        svc = _boot("service", scfg, svc_dir, 180)
        sc = svc.console
        r = sc.run(f"i=0; while [ ! -s {STATS} ] && [ $i -lt 600 ]; do sleep 0.1; "
                   f"i=$((i+1)); done; ip addr add {SVC_IP}/24 dev ev0 && ip link set ev0 up",
                   90)  # fmt: skip
        assert r.status == 0, r.output + sc.run("cat /run/edgevirt/backend.log", 10).output

        qcfg = QemuConfig(s, carveout)
        qcfg.ivshmem_socket = hv.sockets["front-end"]
        prepare_guest(qcfg, fe_dir, Reporter(), devices=("net", "vsock", "console"))
        qcfg.append = f"console={board.console_kernel} panic=-1"
        fe_qemu = QemuProcess(qcfg, fe_dir / "qemu.log")
        assert qcfg.console_socket is not None
        wait_for_path(qcfg.console_socket, 30, "console", fe_qemu)
        fe_con = Console.open(f"unix://{qcfg.console_socket}", log_path=fe_dir / "console.log",
                              name="front-end")  # fmt: skip
        fe_con.expect(rb"EDGEVIRT-AGENT-READY[^\n]*\n", 120, fe_qemu.check_alive)
        fe = fe_con

        # -- net: the front-end pings the service VM's own stack, TCP both ways
        r = fe.run(f"ip link set eth0 up && ip addr add {FE_IP}/24 dev eth0 && "
                   f"ping -c 3 -W 5 {SVC_IP} && ping -c 2 -W 5 -s 1472 {SVC_IP}", 60)  # fmt: skip
        assert r.status == 0 and "2 packets received" in r.output, r.output
        size = 8 * MIB
        t, res = in_thread(sc, py(RECV_TCP, ip=SVC_IP, port=5000, size=size), 240)
        # The service VM's Python takes a while to listen (TCG in TCG): retry until it does.
        r = fe.run("dd if=/dev/urandom of=/tmp/out bs=1M count=8 2>/dev/null && sha256sum "
                   f"/tmp/out && for i in $(seq 60); do nc {SVC_IP} 5000 < /tmp/out && break; "
                   "sleep 1; done", 300)  # fmt: skip
        t.join(240)
        assert r.status == 0, r.output
        assert "r" in res, res
        assert f"GOT {size} {sha(r.output)}" in res["r"].output, res["r"].output
        rates = {"out": res["r"].output}
        t, res = in_thread(sc, py(SEND_TCP, ip=FE_IP, port=5001, size=size), 240)
        r = fe.run("nc -l -p 5001 > /tmp/in; sha256sum /tmp/in", 240)
        t.join(240)
        assert "r" in res, res
        m = re.search(r"SENT (\d+) ([0-9a-f]{64})", res["r"].output)
        assert m and int(m.group(1)) == size and sha(r.output) == m.group(2), res["r"].output
        rates["in"] = res["r"].output

        # -- vsock: CID 2 is the service VM; its unix socket echoes 1 MiB
        t, res = in_thread(sc, py(VSOCK_ECHO, dir=VDIR), 180)
        r = fe.run("dd if=/dev/urandom of=/tmp/v bs=1M count=1 2>/dev/null && "
                   "for i in $(seq 60); do ev-vsock connect 2 5000 < /tmp/v > /tmp/vr 2>/dev/null"
                   " && break; sleep 1; done; sha256sum /tmp/v /tmp/vr", 180)  # fmt: skip
        t.join(180)
        sums = re.findall(r"\b[0-9a-f]{64}\b", r.output)
        assert r.status == 0 and len(sums) == 2 and sums[0] == sums[1], r.output
        assert "r" in res and f"ECHO {MIB} {sums[0]}" in res["r"].output, res
        r = fe.run("ev-vsock connect 2 5999 < /dev/null", 20)
        assert r.status == 1 and "connect: errno 104" in r.output, r.output

        # -- console: a named port both ways, the console port logged in the service VM
        r = fe.run("for p in /sys/class/virtio-ports/*; do echo $(basename $p) "
                   "$(cat $p/name); done", 10)  # fmt: skip
        ports = dict(line.split()[::-1] for line in r.output.splitlines() if line.strip())
        assert set(ports) == {"log", "ctl"}, r.output
        t, res = in_thread(sc, py(CONSOLE_READ, dir=CDIR, size=256 << 10), 60)
        r = fe.run(f"sleep 2; dd if=/dev/{ports['ctl']} bs=1 count=16 2>/dev/null; echo; "
                   "dd if=/dev/urandom of=/tmp/c bs=1k count=256 2>/dev/null && "
                   f"sha256sum /tmp/c && cat /tmp/c > /dev/{ports['ctl']}", 60)  # fmt: skip
        t.join(60)
        assert r.status == 0 and "from-service-vm!" in r.output, r.output
        assert "r" in res and f"CON {256 << 10} {sha(r.output)}" in res["r"].output, res
        fe.run("echo hvc-in-service-vm > /dev/hvc0", 20)
        r = sc.run(f"cat {CDIR}/log.log; cat {STATS}", 20)
        assert "hvc-in-service-vm" in r.output, r.output
        stats = json.loads(r.output[r.output.index("{"):])
        assert stats["protocol_errors"] == 0, stats["errors"]
        for d in stats["devices"]:
            assert d["broken"] == [] and d["refused"] == 0, d
        fe.sendline("poweroff -f")
        fe_qemu.wait(30)
        speeds = {k: re.findall(r"MIB_S ([0-9.]+)", v) for k, v in rates.items()}
        print(json.dumps({"service_vm_tcp_mib_s": speeds}))
    except BaseException:
        if svc is not None:  # the service VM's back-end log, for the failure report
            try:
                log = svc.console.run("tail -40 /run/edgevirt/backend.log", 20).output
                (svc_dir / "backend.log").write_text(log)
            except Exception:
                pass
        raise
    finally:
        if fe_con is not None:
            fe_con.close()
        if fe_qemu is not None:
            fe_qemu.stop()
        if svc is not None:
            svc.console.close()
            svc.qemu.stop()
        hv.stop()
        carveout.unlink(missing_ok=True)
        msgmem.unlink(missing_ok=True)
