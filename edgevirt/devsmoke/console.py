"""virtio-console (MULTIPORT): named ports whose far side is a unix socket and a log.

Two ports: ``log`` (the console port, the guest's ``/dev/hvc0``; everything it writes is
kept in ``log.log``) and ``ctl`` (the guest finds its ``/dev/vportNpM`` by name in
``/sys/class/virtio-ports``). :mod:`edgevirt.devpeer` on the back-end's side (the host, or
the service VM) connects to ``ctl.sock`` and sends a line the guest must read byte-exact
(sha256), then takes :data:`OUT_KIB` KiB the guest writes to the port and hashes them; a
line the guest writes to ``/dev/hvc0`` must be in the log on that side.

QEMU 7.2 has no vhost-user console front-end (its ``virtio-serial`` is built into QEMU), so
`up` runs this device over virtio-msg only (``qemu_kind`` None).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from pathlib import Path

from edgevirt import devpeer
from edgevirt.console.expect import Console
from edgevirt.devsmoke import SERVICE_RUN, DeviceSmoke, FarEnd
from edgevirt.smoke import Check

PORTS = ("log", "ctl")
OUT_KIB = 64
SERVICE_DIR = f"{SERVICE_RUN}/console"


def port_devices(listing: str) -> dict[str, str]:
    """``{port name: vportNpM}`` from lines ``vportNpM NAME`` (sysfs virtio-ports)."""
    out = {}
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].startswith("vport"):
            out[parts[1]] = parts[0]
    return out


class ConsoleSmoke(DeviceSmoke):
    type = "console"
    qemu_kind = None

    def backend_arg(self) -> str:
        return f"console:ports={PORTS[0]}!+{PORTS[1]},dir={self.dir}"

    def service_arg(self) -> str:
        return f"console:ports={PORTS[0]}!+{PORTS[1]},dir={SERVICE_DIR}"

    def _side(self) -> tuple[str, str]:
        """Where the ports' files are, and what to call that side."""
        if self.service is not None:
            return SERVICE_DIR, "service VM"
        return str(self.dir), "host"

    def log_has(self, text: str, timeout: float = 10.0) -> bool:
        """Whether the console port's log on the back-end's side holds ``text`` (it is
        written as the back-end takes the guest's chain: wait a little)."""
        where, _ = self._side()
        if self.service is not None:
            log = f"{where}/{PORTS[0]}.log"
            r = self.service.run(f"for i in $(seq {int(timeout * 10)}); do grep -qF '{text}' "
                                 f"{log} && break; sleep 0.1; done; grep -cF '{text}' {log}",
                                 timeout + 20)  # fmt: skip
            return r.status == 0
        path, deadline = Path(where) / f"{PORTS[0]}.log", time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.is_file() and text.encode() in path.read_bytes():
                return True
            time.sleep(0.1)
        return False

    def run(self, console: Console, prefix: str = "") -> list[Check]:
        r = console.run("for p in /sys/class/virtio-ports/*; do echo $(basename $p) "
                        "$(cat $p/name); done", 10)  # fmt: skip
        ports = port_devices(r.output)
        ok = sorted(ports) == sorted(PORTS)
        checks = [Check(f"{prefix}console ports", ok,
                        ", ".join(f"{n} = /dev/{d}" for n, d in sorted(ports.items())) if ok
                        else f"named ports {ports}, expected {', '.join(PORTS)}")]  # fmt: skip
        if not ok:
            return checks
        where, side = self._side()
        text = f"edgevirt-input-{secrets.token_hex(8)}"  # one shell word, no newline
        size = OUT_KIB << 10
        dev = f"/dev/{ports['ctl']}"
        far = FarEnd(self, "talk", f"{where}/{PORTS[1]}.sock", text, size, timeout=120)
        try:
            r = console.run(f"dd if={dev} of=/tmp/cin bs=1 count={len(text)} 2>/dev/null; "
                            "sha256sum /tmp/cin; dd if=/dev/urandom of=/tmp/cout bs=1k "
                            f"count={OUT_KIB} 2>/dev/null && sha256sum /tmp/cout && "
                            f"cat /tmp/cout > {dev}; rm -f /tmp/cin /tmp/cout", 150)  # fmt: skip
            out = far.output()
        finally:
            far.close()
        sums = r.output.split()
        want = hashlib.sha256(text.encode()).hexdigest()
        ok = len(sums) >= 1 and sums[0] == want
        checks.append(Check(f"{prefix}console input to guest", ok,
                            f"{len(text)} bytes from the {side}'s ctl.sock read on {dev}, "
                            "sha256 equal" if ok
                            else f"guest {r.output.strip()[-160:]!r}, far end "
                            f"{out.strip()[-160:]!r}"))  # fmt: skip
        sent = sums[2] if len(sums) >= 4 else "?"
        ok = r.status == 0 and devpeer.parse(out, "got") == (size, sent)
        checks.append(Check(f"{prefix}console output to {side}", ok,
                            f"{OUT_KIB} KiB written to {dev} arrive on the {side}'s ctl.sock, "
                            f"sha256 {sent[:16]}… equal" if ok
                            else f"guest {r.output.strip()[-160:]!r}, far end "
                            f"{out.strip()[-160:]!r}"))  # fmt: skip
        line = f"edgevirt-hvc-{secrets.token_hex(8)}"
        r = console.run(f"echo {line} > /dev/hvc0", 20)
        ok = r.status == 0 and self.log_has(line)
        checks.append(Check(f"{prefix}console port log", ok,
                            f"a line on /dev/hvc0 (port {PORTS[0]}) is in the {side}'s "
                            f"{PORTS[0]}.log" if ok
                            else f"status {r.status} {r.output.strip()[-120:]!r}; "
                            f"not in {where}/{PORTS[0]}.log"))  # fmt: skip
        return checks
