"""A fake network PDU whose outlets power QEMU boards: a lab on one machine.

It speaks the protocol of labgrid's ``simplerest`` power model (``NetworkPowerPort``):
``GET /outlet/<index>/<1|0>`` switches an outlet, ``GET /outlet/<index>`` answers ``1`` or
``0``. Switching an outlet on starts a QEMU board (edgevirt's guest and back-end, as
``edgevirt test`` would; U-Boot first for a board with a ``[bootloader]``, loading from
the outlet's ``tftp/`` directory) whose UART is a serial device, typically one end of a
``socat`` pty pair whose other end, under ``/dev``, a labgrid exporter publishes as a
``RawSerialPort``; switching it off stops QEMU, as pulling the plug would. The images are
prepared once at start-up (what is "flashed" on the boards).

    python -m edgevirt.lab.fakepdu --board qemu-virt --build out/pdu \\
        --outlet 0=/tmp/lab/board0 --outlet 1=/tmp/lab/board1 [--image DIR] [--port 0]

prints ``ready http://127.0.0.1:PORT/outlet/{index}/{value}`` when it serves. Loopback only.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType

from edgevirt.board import Board
from edgevirt.deploy.machine import QemuMachine
from edgevirt.deploy.target import qemu_firmware
from edgevirt.errors import ConfigError, EdgevirtError
from edgevirt.report import Reporter

log = logging.getLogger(__name__)

PATH = re.compile(r"^/outlet/(\d+)(?:/([01]))?/?$")


class Outlet:
    """One power outlet and the QEMU board behind it."""

    def __init__(self, index: int, machine: QemuMachine) -> None:
        self.index = index
        self.machine = machine
        self.lock = threading.Lock()
        self.switches = 0

    @property
    def on(self) -> bool:
        q = self.machine.qemu
        return q is not None and q.alive()

    def switch(self, on: bool) -> None:
        with self.lock:
            self.switches += 1
            if on and not self.on:
                log.info("outlet %d on: starting QEMU", self.index)
                self.machine.on()
            elif not on:
                log.info("outlet %d off: stopping QEMU", self.index)
                self.machine.off()


class FakePdu:
    def __init__(
        self,
        board: Board,
        build: Path,
        consoles: dict[int, Path],
        *,
        image_dir: Path | None = None,
        reporter: Reporter | None = None,
    ) -> None:
        if not board.is_qemu:
            raise ConfigError(f"the fake PDU powers QEMU boards; {board.name} is a real board")
        firmware, firmware_ram = qemu_firmware(board)
        #: U-Boot boards load over TFTP from QEMU's user network: this outlet's directory
        #: (what the board profile's [tftp] dir must name for a client to stage images).
        tftp = board.boot.chain == "u-boot" and board.raw.get("tftp", {}).get("server") == "qemu"
        self.outlets: dict[int, Outlet] = {}
        reporter = reporter or Reporter()
        try:
            for index, device in sorted(consoles.items()):
                m = QemuMachine(
                    board,
                    build / f"outlet-{index}",
                    firmware=firmware,
                    firmware_ram=firmware_ram,
                    tftp=tftp,
                    console_device=device,
                )
                self.outlets[index] = Outlet(index, m)
                m.prepare(reporter, image_dir=image_dir)
                if image_dir is None:  # built once; the other outlets boot the same images
                    assert m.images is not None
                    image_dir = m.images.kernel.parent
                    if not (image_dir / "initramfs.cpio.gz").is_file():
                        raise ConfigError(f"image build left no initramfs in {image_dir}")
        except BaseException:
            self.close()
            raise

    def serve(self, port: int = 0) -> ThreadingHTTPServer:
        pdu = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                m = PATH.match(self.path)
                if m is None:
                    self._reply(404, f"expected /outlet/<index>[/<0|1>], got {self.path}\n")
                    return
                outlet = pdu.outlets.get(int(m.group(1)))
                if outlet is None:
                    self._reply(404, f"no outlet {m.group(1)} (have {sorted(pdu.outlets)})\n")
                    return
                if m.group(2) is not None:
                    try:
                        outlet.switch(m.group(2) == "1")
                    except EdgevirtError as e:
                        self._reply(500, f"outlet {outlet.index}: {e}\n")
                        return
                self._reply(200, "1" if outlet.on else "0")

            def _reply(self, code: int, text: str) -> None:
                body = text.encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                log.info("%s %s", self.address_string(), format % args)

        return ThreadingHTTPServer(("127.0.0.1", port), Handler)

    def close(self) -> None:
        for outlet in self.outlets.values():
            try:
                outlet.machine.close()
            except EdgevirtError as e:
                log.warning("outlet %d: %s", outlet.index, e)


def _outlet(text: str) -> tuple[int, Path]:
    index, sep, path = text.partition("=")
    if not sep or not index.isdigit() or not path:
        raise argparse.ArgumentTypeError(f"--outlet {text!r}: expected INDEX=SERIAL_DEVICE")
    return int(index), Path(path)


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    from edgevirt.board import load_board

    ap = argparse.ArgumentParser(
        prog="python -m edgevirt.lab.fakepdu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--board", default="qemu-virt")
    ap.add_argument("--build", type=Path, required=True, help="QEMU build dirs and logs")
    ap.add_argument("--outlet", type=_outlet, action="append", required=True)
    ap.add_argument("--image", type=Path, default=None, help="Image + initramfs.cpio.gz")
    ap.add_argument("--port", type=int, default=0, help="HTTP port on 127.0.0.1 (0: any)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="fakepdu %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        pdu = FakePdu(
            load_board(args.board), args.build.resolve(), dict(args.outlet), image_dir=args.image
        )
    except EdgevirtError as e:
        print(f"fakepdu: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    try:
        server = pdu.serve(args.port)
        url = f"http://127.0.0.1:{server.server_address[1]}/outlet/{{index}}/{{value}}"
        print(f"ready {url}", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        pdu.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
