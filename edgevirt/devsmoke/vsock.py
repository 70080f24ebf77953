"""virtio-vsock: the guest's streams end on unix sockets of the back-end's side.

The guest's ``ev-vsock`` tool (initramfs) sends data to CID 2 port 5000, whose unix socket
(``<dir>/vsock_5000``) :mod:`edgevirt.devpeer` listens on, on the host or inside the
service VM (CID 2 is then the service VM); it answers with its own data on the same stream
and both sha256s are compared. A port nobody listens on must reset the connection
(ECONNRESET). The service VM runs under TCG: :data:`SERVICE_MIB` there, said in the detail.
"""

from __future__ import annotations

from pathlib import Path

from edgevirt import devpeer
from edgevirt.console.expect import Console
from edgevirt.devsmoke import SERVICE_RUN, DeviceSmoke, FarEnd
from edgevirt.smoke import Check

GUEST_CID = 3
PORT = 5000
VSOCK_MIB = 8
SERVICE_MIB = 4
SERVICE_DIR = f"{SERVICE_RUN}/vsock"
RETRY = 60


class VsockSmoke(DeviceSmoke):
    type = "vsock"
    qemu_kind = "vhost-user-vsock-device"

    def __init__(self, workdir: Path, mib: int = VSOCK_MIB) -> None:
        super().__init__(workdir)
        self.mib = mib

    def backend_arg(self) -> str:
        return f"vsock:cid={GUEST_CID},dir={self.dir}"

    def service_arg(self) -> str:
        return f"vsock:cid={GUEST_CID},dir={SERVICE_DIR}"

    def run(self, console: Console, prefix: str = "") -> list[Check]:
        if self.service is not None:
            where, mib = "the service VM", min(self.mib, SERVICE_MIB)
            path, note = f"{SERVICE_DIR}/vsock_{PORT}", f" (service VM under TCG: {mib} MiB)"
        else:
            where, mib, path, note = "the host", self.mib, str(self.dir / f"vsock_{PORT}"), ""
        size = mib << 20
        far = FarEnd(self, "serve", path, size)
        try:
            r = console.run(f"dd if=/dev/urandom of=/tmp/vout bs=1M count={mib} 2>/dev/null && "
                            f"sha256sum /tmp/vout && for i in $(seq {RETRY}); do ev-vsock "
                            f"connect 2 {PORT} < /tmp/vout > /tmp/vin 2>/dev/null && break; "
                            "sleep 1; done && sha256sum /tmp/vin; rm -f /tmp/vout /tmp/vin",
                            RETRY + 180)  # fmt: skip
            out = far.output()
        finally:
            far.close()
        sums = r.output.split()
        sent = sums[0] if sums else "?"
        ok = r.status == 0 and devpeer.parse(out, "got") == (size, sent)
        checks = [
            Check(
                f"{prefix}vsock guest → host",
                ok,
                f"{mib} MiB to unix socket vsock_{PORT} in {where}, sha256 {sent[:16]}… "
                f"equal{note}"
                if ok
                else f"guest {r.output.strip()[-160:]!r}, far end {out.strip()[-160:]!r}",
            )
        ]
        answer = devpeer.parse(out, "sent")
        ok = r.status == 0 and answer is not None and len(sums) >= 3 and sums[2] == answer[1]
        checks.append(
            Check(
                f"{prefix}vsock host → guest",
                ok,
                f"{mib} MiB back on the same stream, sha256 {sums[2][:16]}… equal{note}"
                if ok
                else f"guest {r.output.strip()[-160:]!r}, far end {out.strip()[-160:]!r}",
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
