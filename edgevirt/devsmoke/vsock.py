"""virtio-vsock: the guest's streams end on unix sockets of the back-end's side.

Both ways a stream opens (hybrid mode), with :mod:`edgevirt.devpeer` as the far end on the
host or inside the service VM (CID 2 is then the service VM):

* the guest opens it: the ``ev-vsock`` tool (initramfs) sends data to CID 2 port
  :data:`PORT`, whose unix socket (``<dir>/vsock_5000``) the far end listens on; it answers
  with its own data on the same stream;
* the host side opens it: the far end connects to ``<dir>/vsock``, writes
  ``CONNECT <port>``, gets ``OK <host port>`` once ``ev-vsock listen`` in the guest
  accepted, takes the guest's data and answers with its own.

Every direction's sha256 is compared at the receiving end. A port nobody listens on must
reset the connection (ECONNRESET). The service VM runs under TCG: :data:`SERVICE_MIB`
there, said in the detail.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from edgevirt import devpeer
from edgevirt.console.expect import Console
from edgevirt.devsmoke import SERVICE_RUN, DeviceSmoke, FarEnd
from edgevirt.smoke import Check

GUEST_CID = 3
PORT = 5000
#: The guest's listener for the stream the host side opens.
LISTEN_PORT = 6000
#: How long that listener waits for the far end (a far end that never comes fails the check).
LISTEN_S = 200
VSOCK_MIB = 8
SERVICE_MIB = 4
SERVICE_DIR = f"{SERVICE_RUN}/vsock"
RETRY = 60


class Exchange(NamedTuple):
    """One stream's data both ways: each direction's verdict and sha256s, the far end's
    output, and the detail of a failure."""

    up: bool  # guest → far end
    down: bool  # far end → guest
    sent: str
    back: str
    out: str
    fail: str


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
            mib = min(self.mib, SERVICE_MIB)
            where, note = "the service VM", f" (service VM under TCG: {mib} MiB)"
            base = SERVICE_DIR
        else:
            where, mib, note, base = "the host", self.mib, "", str(self.dir)
        checks = self._guest_opened(console, prefix, f"{base}/vsock_{PORT}", mib, where, note)
        checks += self._host_opened(console, prefix, f"{base}/vsock", mib, where, note)
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

    def _guest_opened(self, console: Console, prefix: str, path: str, mib: int, where: str,
                      note: str) -> list[Check]:  # fmt: skip
        """The guest connects to CID 2 port :data:`PORT`: the far end listens on ``path``."""
        tool = (f"for i in $(seq {RETRY}); do ev-vsock connect 2 {PORT} < /tmp/vout > /tmp/vin "
                "2>/dev/null && break; sleep 1; done")  # fmt: skip
        x = self._exchange(console, mib, ("serve", path, mib << 20), tool, RETRY + 180)
        name = path.rsplit("/", 1)[-1]
        return [
            Check(f"{prefix}vsock guest → host", x.up,
                  f"{mib} MiB to unix socket {name} in {where}, sha256 {x.sent[:16]}… "
                  f"equal{note}" if x.up else x.fail),
            Check(f"{prefix}vsock host → guest", x.down,
                  f"{mib} MiB back on the same stream, sha256 {x.back[:16]}… equal{note}"
                  if x.down else x.fail),
        ]  # fmt: skip

    def _host_opened(self, console: Console, prefix: str, path: str, mib: int, where: str,
                     note: str) -> list[Check]:  # fmt: skip
        """The far end opens the stream (hybrid mode: ``CONNECT`` on ``path``) to the guest's
        listener on :data:`LISTEN_PORT`; the guest sends first, then reads the answer. The far
        end retries CONNECT until the guest listens; ``timeout`` ends the listener if the far
        end never comes."""
        x = self._exchange(console, mib, ("connect", path, LISTEN_PORT, mib << 20),
                           f"timeout {LISTEN_S} ev-vsock listen {LISTEN_PORT} < /tmp/vout > "
                           "/tmp/vin", LISTEN_S + 60)  # fmt: skip
        hostport = next((ln.split()[1] for ln in x.out.splitlines()
                         if ln.startswith("connected ") and len(ln.split()) == 2), "?")  # fmt: skip
        name = path.rsplit("/", 1)[-1]
        return [
            Check(f"{prefix}vsock host-opened, guest → host", x.up,
                  f"CONNECT {LISTEN_PORT} on unix socket {name} in {where} (OK {hostport}), "
                  f"the guest's listener sends {mib} MiB, sha256 {x.sent[:16]}… equal{note}"
                  if x.up else x.fail),
            Check(f"{prefix}vsock host-opened, host → guest", x.down,
                  f"{mib} MiB back on the stream the host side opened, sha256 "
                  f"{x.back[:16]}… equal{note}" if x.down else x.fail),
        ]  # fmt: skip

    def _exchange(self, console: Console, mib: int, far_args: tuple[object, ...], tool: str,
                  timeout: float) -> Exchange:  # fmt: skip
        """The guest's ``tool`` sends ``/tmp/vout`` (``mib`` MiB of random data) to the far
        end (devpeer ``far_args``) and writes the far end's answer to ``/tmp/vin``. In the
        foreground: busybox ash as PID 1 exits when a background job ends (see net)."""
        size = mib << 20
        far = FarEnd(self, *far_args)
        try:
            r = console.run(f"dd if=/dev/urandom of=/tmp/vout bs=1M count={mib} 2>/dev/null && "
                            f"sha256sum /tmp/vout && {tool} && sha256sum /tmp/vin; "
                            "rm -f /tmp/vout /tmp/vin", timeout)  # fmt: skip
            out = far.output()
        finally:
            far.close()
        sums = r.output.split()
        sent = sums[0] if sums else "?"
        back = sums[2] if len(sums) >= 3 else "?"
        return Exchange(
            up=r.status == 0 and devpeer.parse(out, "got") == (size, sent),
            down=r.status == 0 and devpeer.parse(out, "sent") == (size, back),
            sent=sent, back=back, out=out,
            fail=f"guest {r.output.strip()[-160:]!r}, far end {out.strip()[-160:]!r}",
        )  # fmt: skip
