"""virtio-net: the guest's NIC on a TAP in a network namespace this run creates.

The guest pings the namespace's end (64-byte and MTU-sized frames) and moves data over
TCP both ways, the sha256 checked at the far end. Nothing touches the host's own network.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from edgevirt.console.expect import Console
from edgevirt.devsmoke import DeviceSmoke
from edgevirt.errors import SetupError
from edgevirt.smoke import Check

GUEST_IP, PEER_IP = "10.0.2.15", "10.0.2.1"
NET_MIB = 32

#: Runs in the namespace: ``recv HOST PORT SIZE`` prints ``listening`` then ``n sha256``;
#: ``send HOST PORT SIZE`` retries the connection until the guest listens.
NS_PEER = r"""
import hashlib, socket, sys
mode, host, port, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if mode == "recv":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port)); s.listen(1); print("listening", flush=True)
    c, _ = s.accept(); h = hashlib.sha256(); n = 0
    while n < size:
        b = c.recv(1 << 16)
        if not b: break
        h.update(b); n += len(b)
    c.close(); print(n, h.hexdigest(), flush=True)
else:
    import os, time
    data = os.urandom(size)
    for _ in range(1200):
        try:
            c = socket.create_connection((host, port), timeout=5); break
        except OSError:
            time.sleep(0.1)
    c.sendall(data); c.close(); print(size, hashlib.sha256(data).hexdigest(), flush=True)
"""


def in_netns(ns: str, *argv: str) -> list[str]:
    """``argv`` run inside the named network namespace.

    nsenter enters only the network namespace; ``ip -n``/``ip netns exec`` also unshare the
    mount namespace and remount / as a slave, which fails where / is not a mount point (a
    chroot, some containers) with exit 255.
    """
    return ["nsenter", f"--net=/run/netns/{ns}", *argv]


def ns_peer(ns: str, *args: str) -> subprocess.Popen[str]:
    """The TCP peer (:data:`NS_PEER`) inside network namespace ``ns``."""
    return subprocess.Popen(
        in_netns(ns, sys.executable, "-c", NS_PEER, *args),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _ip(*args: str, ns: str | None = None) -> None:
    argv = ["ip", *args] if ns is None else in_netns(ns, "ip", *args)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise SetupError(f"{' '.join(argv)}: {r.stderr.strip()}")


class NetSmoke(DeviceSmoke):
    type = "net"
    qemu_kind = "virtio-net-device"
    qemu_options = {"mac": "52:54:00:12:34:56"}

    def __init__(self, workdir: Path, mib: int = NET_MIB) -> None:
        super().__init__(workdir)
        self.mib = mib
        self.netns = f"evup{os.getpid()}{secrets.token_hex(2)}"
        self.tap = "evtap0"
        self.created = False

    def backend_arg(self) -> str:
        return f"net:tap={self.tap},netns={self.netns}"

    def before_backend(self) -> None:
        if os.geteuid() != 0:
            raise SetupError("the net smoke checks need root: a network namespace and a TAP")
        if self.created:  # a power cycle: the namespace (and its TAP) stay
            return
        _ip("netns", "add", self.netns)
        self.created = True

    def after_backend(self) -> None:
        addr = subprocess.run(in_netns(self.netns, "ip", "-o", "addr", "show", "dev", self.tap),
                              capture_output=True, text=True, timeout=30).stdout  # fmt: skip
        if PEER_IP in addr:
            return
        for cmd in (("addr", "add", f"{PEER_IP}/24", "dev", self.tap),
                    ("link", "set", self.tap, "up"), ("link", "set", "lo", "up")):  # fmt: skip
            _ip(*cmd, ns=self.netns)

    def close(self) -> None:
        if self.created:
            subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, timeout=30)
            self.created = False

    def run(self, console: Console, prefix: str = "") -> list[Check]:
        checks = []
        r = console.run(
            f"ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0 && "
            f"ping -c 3 -W 5 {PEER_IP} && ping -c 2 -W 5 -s 18 {PEER_IP} && "
            f"ping -c 2 -W 5 -s 1472 {PEER_IP}",
            60,
        )
        ok = r.status == 0 and r.output.count("packets received") == 3
        checks.append(Check(f"{prefix}net ping", ok,
                            f"guest {GUEST_IP} pings TAP peer {PEER_IP} in netns "
                            f"{self.netns}: 64-byte and 1500-byte frames" if ok
                            else r.output.strip()[-200:]))  # fmt: skip
        if not ok:
            return checks
        size = self.mib << 20
        srv = ns_peer(self.netns, "recv", PEER_IP, "5000", str(size))
        try:
            assert srv.stdout is not None
            srv.stdout.readline()
            t0 = time.monotonic()
            r = console.run(f"dd if=/dev/urandom of=/tmp/nout bs=1M count={self.mib} "
                            f"2>/dev/null && sha256sum /tmp/nout && nc {PEER_IP} 5000 < /tmp/nout;"
                            " rm -f /tmp/nout", 240)  # fmt: skip
            out, err = srv.communicate(timeout=60)
        finally:
            if srv.poll() is None:
                srv.kill()
        sent = r.output.split()[0] if r.output.split() else "?"
        ok = r.status == 0 and out.split() == [str(size), sent]
        checks.append(
            Check(
                f"{prefix}net TCP guest → peer",
                ok,
                f"{self.mib} MiB in {time.monotonic() - t0:.1f}s, peer's sha256 "
                f"{sent[:16]}… equals the guest's"
                if ok
                else f"guest {r.output.strip()[-120:]!r}, peer {out!r} {err[-120:]!r}",
            )
        )
        snd = ns_peer(self.netns, "send", GUEST_IP, "5001", str(size))
        try:
            t0 = time.monotonic()
            # In the foreground: busybox ash as PID 1 exits when a background job ends while
            # it reads a command line; the sender retries until the guest listens.
            r = console.run("nc -l -p 5001 > /tmp/nin; sha256sum /tmp/nin; rm -f /tmp/nin", 240)
            out, err = snd.communicate(timeout=60)
        finally:
            if snd.poll() is None:
                snd.kill()
        want = out.split()[1] if len(out.split()) == 2 else "?"
        got = r.output.split()[0] if r.output.split() else ""
        ok = snd.returncode == 0 and got == want
        checks.append(
            Check(
                f"{prefix}net TCP peer → guest",
                ok,
                f"{self.mib} MiB in {time.monotonic() - t0:.1f}s, guest's sha256 "
                f"{want[:16]}… equals the peer's"
                if ok
                else f"guest {r.output.strip()[-120:]!r}, peer {out!r} {err[-120:]!r}",
            )
        )
        return checks
