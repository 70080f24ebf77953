"""virtio-vsock: the guest's streams end on unix sockets of the host side.

The guest's ``ev-vsock`` tool (initramfs) sends data to host port 5000, whose unix socket
(``<dir>/vsock_5000``) this run listens on and answers with its own data; both sha256s are
compared. A port nobody listens on must reset the connection (ECONNRESET).
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from pathlib import Path

from edgevirt.console.expect import Console
from edgevirt.devsmoke import DeviceSmoke
from edgevirt.smoke import Check

GUEST_CID = 3
PORT = 5000
VSOCK_MIB = 8


class VsockSmoke(DeviceSmoke):
    type = "vsock"
    qemu_kind = "vhost-user-vsock-device"

    def __init__(self, workdir: Path, mib: int = VSOCK_MIB) -> None:
        super().__init__(workdir)
        self.mib = mib
        self.got: dict[str, str] = {}
        self.reply = b""
        self.srv: socket.socket | None = None

    def backend_arg(self) -> str:
        return f"vsock:cid={GUEST_CID},dir={self.dir}"

    def before_backend(self) -> None:
        if self.srv is not None:  # a power cycle: keep listening
            return
        path = self.dir / f"vsock_{PORT}"
        path.unlink(missing_ok=True)
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(1)
        self.srv.settimeout(300)

    def _serve(self) -> None:
        assert self.srv is not None
        try:
            c, _ = self.srv.accept()
            with c:
                h, n = hashlib.sha256(), 0
                while b := c.recv(1 << 16):
                    h.update(b)
                    n += len(b)
                self.got["from_guest"] = f"{n} {h.hexdigest()}"
                c.sendall(self.reply)
        except OSError as e:
            self.got["error"] = str(e)

    def run(self, console: Console, prefix: str = "") -> list[Check]:
        self.reply = os.urandom(self.mib << 20)
        t = threading.Thread(target=self._serve, daemon=True)
        t.start()
        size = self.mib << 20
        r = console.run(f"dd if=/dev/urandom of=/tmp/vout bs=1M count={self.mib} 2>/dev/null"
                        f" && sha256sum /tmp/vout && ev-vsock connect 2 {PORT} < /tmp/vout > "
                        "/tmp/vin && sha256sum /tmp/vin; rm -f /tmp/vout /tmp/vin",
                        180)  # fmt: skip
        t.join(30)
        sums = r.output.split()
        sent = sums[0] if sums else "?"
        ok = r.status == 0 and self.got.get("from_guest") == f"{size} {sent}"
        checks = [
            Check(
                f"{prefix}vsock guest → host",
                ok,
                f"{self.mib} MiB to unix socket vsock_{PORT}, sha256 {sent[:16]}… equal"
                if ok
                else f"guest {r.output.strip()[-160:]!r}, host {self.got}",
            )
        ]
        want = hashlib.sha256(self.reply).hexdigest()
        ok = r.status == 0 and len(sums) >= 3 and sums[2] == want
        checks.append(
            Check(
                f"{prefix}vsock host → guest",
                ok,
                f"{self.mib} MiB back on the same stream, sha256 {want[:16]}… equal"
                if ok
                else f"guest {r.output.strip()[-160:]!r}",
            )
        )
        r = console.run(f"ev-vsock connect 2 {PORT + 999} < /dev/null", 20)
        ok = r.status == 1 and "connect: errno 104" in r.output
        checks.append(
            Check(
                f"{prefix}vsock closed port",
                ok,
                f"connect to port {PORT + 999} fails with ECONNRESET"
                if ok
                else f"status {r.status}: {r.output.strip()[-160:]}",
            )
        )
        return checks

    def close(self) -> None:
        if self.srv is not None:
            self.srv.close()
            self.srv = None
