"""virtio-net: the guest's NIC on a TAP, and the network stack behind that TAP.

Host back-end: a TAP in a network namespace this run creates (nothing touches the host's
own network). Back-end in the service VM: a TAP inside the service VM, so the guest reaches
the service VM's own stack, the way a service VM that owns the car's Ethernet would route
it. The guest pings the TAP's end (64-byte and MTU-sized frames) and moves data over TCP
both ways with :mod:`edgevirt.devpeer` as the far end, the sha256 checked on both sides.
The service VM runs under TCG (0.4–1.2 MiB/s through its stack measured under load): it moves
:data:`SERVICE_MIB` instead of :data:`NET_MIB`, and the check's detail says so.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from edgevirt import devpeer
from edgevirt.console.expect import Console
from edgevirt.devsmoke import DeviceSmoke, FarEnd
from edgevirt.errors import DeployError, SetupError
from edgevirt.smoke import Check

GUEST_IP, PEER_IP = "10.0.2.15", "10.0.2.1"
NET_MIB = 32
SERVICE_MIB = 8
#: The TAP the service VM's back-end creates.
SERVICE_TAP = "ev0"
#: The guest side retries its connection this many seconds (the far end may start slowly).
RETRY = 60


def in_netns(ns: str, *argv: str) -> list[str]:
    """``argv`` run inside the named network namespace.

    nsenter enters only the network namespace; ``ip -n``/``ip netns exec`` also unshare the
    mount namespace and remount / as a slave, which fails where / is not a mount point (a
    chroot, some containers) with exit 255.
    """
    return ["nsenter", f"--net=/run/netns/{ns}", *argv]


def ns_peer(ns: str, *args: str) -> subprocess.Popen[str]:
    """:mod:`edgevirt.devpeer` (``recv``/``send HOST PORT SIZE``) in network namespace ``ns``."""
    return subprocess.Popen(
        in_netns(ns, sys.executable, "-m", "edgevirt.devpeer", *args),
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

    def service_arg(self) -> str:
        return f"net:tap={SERVICE_TAP}"

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

    def service_ready(self) -> None:
        assert self.service is not None
        # Again after a service-VM restart: its new back-end made a new TAP.
        r = self.service.run(f"{{ ip addr show dev {SERVICE_TAP} | grep -q ' {PEER_IP}/' || "
                             f"ip addr add {PEER_IP}/24 dev {SERVICE_TAP}; }} && "
                             f"ip link set {SERVICE_TAP} up && ip link set lo up", 60)  # fmt: skip
        if r.status != 0:
            raise DeployError(f"service VM: addressing its TAP {SERVICE_TAP}: {r.output[-200:]}")

    def close(self) -> None:
        if self.created:
            subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, timeout=30)
            self.created = False

    def _far(self, *args: object) -> FarEnd:
        wrap = () if self.service is not None else tuple(in_netns(self.netns))
        return FarEnd(self, *args, wrap=wrap)

    def run(self, console: Console, prefix: str = "") -> list[Check]:
        if self.service is not None:
            peer, mib = f"the service VM's stack ({SERVICE_TAP})", min(self.mib, SERVICE_MIB)
            note = f" (service VM under TCG: {mib} MiB, not {self.mib})"
        else:
            peer, mib, note = f"netns {self.netns}", self.mib, ""
        checks = []
        r = console.run(
            f"ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0 && "
            f"ping -c 3 -W 5 {PEER_IP} && ping -c 2 -W 5 -s 18 {PEER_IP} && "
            f"ping -c 2 -W 5 -s 1472 {PEER_IP}",
            60,
        )
        ok = r.status == 0 and r.output.count("packets received") == 3
        checks.append(Check(f"{prefix}net ping", ok,
                            f"guest {GUEST_IP} pings TAP peer {PEER_IP} in {peer}: 64-byte "
                            "and 1500-byte frames" if ok
                            else r.output.strip()[-200:]))  # fmt: skip
        if not ok:
            return checks
        size = mib << 20
        far = self._far("recv", PEER_IP, 5000, size)
        try:
            t0 = time.monotonic()
            r = console.run(f"dd if=/dev/urandom of=/tmp/nout bs=1M count={mib} 2>/dev/null && "
                            f"sha256sum /tmp/nout && for i in $(seq {RETRY}); do "
                            f"nc {PEER_IP} 5000 < /tmp/nout && break; sleep 1; done; "
                            "rm -f /tmp/nout", RETRY + 240)  # fmt: skip
            took = time.monotonic() - t0
            out = far.output()
        finally:
            far.close()
        sent = r.output.split()[0] if r.output.split() else "?"
        ok = r.status == 0 and devpeer.parse(out, "got") == (size, sent)
        checks.append(
            Check(
                f"{prefix}net TCP guest → peer",
                ok,
                f"{mib} MiB in {took:.1f}s, peer's sha256 {sent[:16]}… equals the guest's{note}"
                if ok
                else f"guest {r.output.strip()[-120:]!r}, peer {out.strip()[-160:]!r}",
            )
        )
        far = self._far("send", GUEST_IP, 5001, size)
        try:
            t0 = time.monotonic()
            # In the foreground: busybox ash as PID 1 exits when a background job ends while
            # it reads a command line; the sender retries until the guest listens.
            r = console.run("nc -l -p 5001 > /tmp/nin; sha256sum /tmp/nin; rm -f /tmp/nin", 240)
            took = time.monotonic() - t0
            out = far.output()
        finally:
            far.close()
        sent_by = devpeer.parse(out, "sent")
        want = sent_by[1] if sent_by else "?"
        got = r.output.split()[0] if r.output.split() else ""
        ok = sent_by is not None and got == want
        checks.append(
            Check(
                f"{prefix}net TCP peer → guest",
                ok,
                f"{mib} MiB in {took:.1f}s, guest's sha256 {want[:16]}… equals the peer's{note}"
                if ok
                else f"guest {r.output.strip()[-120:]!r}, peer {out.strip()[-160:]!r}",
            )
        )
        return checks
