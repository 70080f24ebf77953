"""A target: a board's console, its power and its boot strategy, assembled from the profile.

QEMU boards get a :class:`~edgevirt.deploy.machine.QemuMachine` as power; real boards get
``[power]`` (commands, manual, or ``qemu-model``: QEMU's model of the SoC running the
board's own firmware, :mod:`~edgevirt.deploy.socmodel`) and the console URL from
``[console]``. ``[boot] chain`` picks the strategy: ``u-boot`` loads the images over TFTP
(files or a FIT), over the console with ymodem, or boots the SD card edgevirt wrote
(``sdcard``: U-Boot's own distro boot runs its boot.scr); ``direct`` boots a QEMU kernel;
a chain edgevirt does not drive is refused at once, saying what to do instead.

Sections parsed here (from ``Board.raw``; the rest of the profile is board.py's)::

    [power]  kind = "qemu" | "command" | "manual" | "qemu-model" (deploy/socmodel.py)
             firmware = "/usr/lib/u-boot/qemu_arm64/u-boot.bin"   (QEMU + [bootloader])
             firmware_ram = "128M"      (RAM node U-Boot runs and loads in, above the carve-out)
             on / off / reset / timeout (kind = "command")
    [tftp]   server = "qemu"            (QEMU's user network serves build/tftp)
             server = "192.168.1.10"    (a TFTP server the board reaches; dir = what it serves)
             dir = "/srv/tftp/edgevirt"; ipaddr = "dhcp" | "192.168.1.50"; load = "files" | "fit"
    [sdcard]   the card's layout (image/sdcard.py)
    [fastboot] the fastboot chain (deploy/fastboot.py)
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from edgevirt.board import Board, get_key, parse_size
from edgevirt.console.expect import Console
from edgevirt.deploy.boardimage import prepare_board_images
from edgevirt.deploy.machine import DEVICES, ExternalBus, Images, QemuMachine, mmio_nodes
from edgevirt.deploy.power import Power, board_power, no_operator
from edgevirt.deploy.socmodel import QemuModel
from edgevirt.deploy.strategy import BootStrategy, State, UBootStrategy
from edgevirt.deploy.uboot import UBoot, UBootSettings, lzma_alone
from edgevirt.errors import ConfigError, DeployError
from edgevirt.report import Reporter
from edgevirt.spec import SystemSpec

log = logging.getLogger(__name__)

DEFAULT_FIRMWARE = Path("/usr/lib/u-boot/qemu_arm64/u-boot.bin")
LOAD_METHODS = ("tftp", "fit", "ymodem", "sdcard")
#: Chains edgevirt knows but does not drive (board.BOOT_CHAINS): what the user does instead.
UNDRIVEN_CHAINS = {
    "uefi": (
        "edgevirt does not drive a UEFI boot manager. Build the images "
        "(`edgevirt image build --board {board} -o DIR`), copy Image (an EFI stub kernel), "
        "initramfs.cpio.gz and guest.dtb to the board's EFI system partition, boot them from "
        "its firmware menu or GRUB, then attach with `edgevirt console --board {board}` and "
        "run suites on the shell"
    ),
}


class ChainNotDriven(DeployError):
    """The board boots through a chain edgevirt cannot drive (the hint says what to do)."""


#: Keep the images where they were loaded: U-Boot would otherwise copy them below its
#: notion of the top of RAM, which on QEMU is not all of the guest's RAM.
NO_RELOCATE = "0xffffffffffffffff"


@dataclass
class DeployOptions:
    build_dir: Path
    image_dir: Path | None = None
    #: U-Boot boards: "tftp" (kernel, initramfs, DTB), "fit" (one .itb over TFTP), "ymodem".
    load: str | None = None
    restrict: bool = True
    boot_timeout: float = 120.0
    kernel_fragment: Path | None = None
    #: Manual power: shows the request to a person and returns when they are done.
    ask: Callable[[str], None] | None = None
    uboot: UBootSettings | None = None
    #: Reach the console through this URL instead (ser2net/RFC2217 in front of the target).
    console_url: str | None = None
    #: QEMU boards: export the console with ser2net and use it over rfc2217:// (a lab's way).
    ser2net: bool = False
    #: QEMU boards: "vhost-user" or "msg" (virtio-msg over ivshmem-doorbell).
    transport: str = "vhost-user"
    #: QEMU boards: the system spec whose devices and carve-out the guest gets.
    spec: SystemSpec | None = None
    #: QEMU boards, transport "msg": a bus served elsewhere (the service VM's host side).
    external: ExternalBus | None = None
    #: Power and console supplied from outside (a labgrid place, edgevirt.lab): the board
    #: profile only gives the boot strategy; a profile without [bootloader] boots what the
    #: board holds when powered (e.g. a QEMU board behind a lab's power switch).
    power: Power | None = None
    #: Name for the console in messages and logs [default: the board's name].
    label: str | None = None


def _uboot_settings(board: Board) -> UBootSettings:
    bl: dict[str, Any] = board.raw.get("bootloader", {})
    w = board.where("bootloader")
    d = UBootSettings()
    return UBootSettings(
        prompt=get_key(bl, "prompt", str, w, d.prompt),
        autoboot=get_key(bl, "autoboot", str, w, d.autoboot),
        interrupt=get_key(bl, "interrupt", str, w, d.interrupt),
        retries=get_key(bl, "retries", int, w, d.retries),
        loady_baudrate=loady_baudrate(bl, w),
    )


#: Rates a UART and U-Boot's ``loady ADDR BAUD`` are commonly good for (the host's adapter
#: must do the same): anything else in a profile is most likely a typo.
LOADY_BAUDRATES = (115200, 230400, 460800, 500000, 576000, 921600, 1000000, 1500000,
                   2000000, 3000000, 4000000)  # fmt: skip


def loady_baudrate(bl: dict[str, Any], where: str) -> int | None:
    rate = get_key(bl, "loady_baudrate", int, where, 0)
    if rate and rate not in LOADY_BAUDRATES:
        raise ConfigError(
            f"{where}.loady_baudrate: {rate} is not a UART rate edgevirt knows; expected one "
            f"of {', '.join(map(str, LOADY_BAUDRATES))}"
        )
    return rate or None


def qemu_firmware(board: Board) -> tuple[Path | None, int]:
    """A QEMU board's firmware (U-Boot when it has a [bootloader]) and the RAM node it
    runs in: ([power] firmware, [power] firmware_ram in bytes)."""
    pw = board.raw.get("power", {})
    w = board.where("power")
    uboot = board.boot.chain == "u-boot"
    firmware = None
    if uboot:
        firmware = Path(get_key(pw, "firmware", str, w, str(DEFAULT_FIRMWARE)))
        if not firmware.is_file():
            from edgevirt.errors import SetupError

            raise SetupError(
                f"U-Boot firmware {firmware} not found", hint="apt-get install u-boot-qemu"
            )
    fw_ram = get_key(pw, "firmware_ram", (str, int), w, "128M" if uboot else 0)
    return firmware, parse_size(fw_ram, f"{w}.firmware_ram") if fw_ram else 0


def check_chain(board: Board) -> None:
    """Refuse, before anything starts, a board whose boot chain edgevirt does not drive."""
    chain = board.boot.chain
    if not chain:
        raise ChainNotDriven(
            f"{board.where('boot')}: the profile does not say how {board.name} boots; "
            "nothing was started",
            hint='add [boot] chain = "u-boot" (with a [bootloader]) or "fastboot" '
            "(with a [fastboot]) to the profile",
        )
    if not board.boot.driven:
        raise ChainNotDriven(
            f"{board.where('boot')}.chain = {chain!r}: edgevirt does not drive this boot "
            f"chain ({' → '.join(board.boot.stages) or chain}); nothing was started",
            hint=UNDRIVEN_CHAINS.get(chain, "").format(board=board.name) or None,
        )


def load_method(board: Board, requested: str | None) -> str:
    """How the images reach the board: the chain's own way (fastboot), else ``--load``, else
    what the profile offers: ``[tftp]`` (files or a FIT), an ``[sdcard]``, the console."""
    tftp: dict[str, Any] = board.raw.get("tftp", {})
    card = "sdcard" in board.raw
    if board.boot.chain == "fastboot":
        if requested not in (None, "fastboot"):
            raise ConfigError(
                f"{board.where('boot')}: --load {requested} is for U-Boot boards; "
                f"{board.name} boots an Android boot image over fastboot"
            )
        return "fastboot"
    if requested is None:
        if tftp:
            return "fit" if tftp.get("load") == "fit" else "tftp"
        return "sdcard" if card else "ymodem"
    if requested not in LOAD_METHODS:
        raise ConfigError(f"load method {requested!r}: expected one of {LOAD_METHODS}")
    if requested in ("tftp", "fit") and not tftp:
        raise ConfigError(f"{board.where('tftp')}: load over TFTP needs a [tftp] section")
    if requested == "sdcard" and not card:
        raise ConfigError(f"{board.where('sdcard')}: booting from a card needs [sdcard]")
    return requested


class Target:
    """Use as a context manager: leaving it powers off and stops all it started."""

    def __init__(self, board: Board, opts: DeployOptions, reporter: Reporter | None = None):
        self.board = board
        self.opts = opts
        self.reporter = reporter or Reporter()
        self.build = opts.build_dir.resolve()
        self.build.mkdir(parents=True, exist_ok=True)
        self.raw = board.raw
        chain = board.boot.chain
        check_chain(board)
        self.uboot = chain == "u-boot"
        self.tftp: dict[str, Any] = self.raw.get("tftp", {})
        self.load = load_method(board, opts.load)
        self.machine: QemuMachine | None = None
        self.model: QemuModel | None = None
        self.images: Images | None = None
        power: Power
        if opts.power is not None:
            if not opts.console_url:
                raise ConfigError(f"{board.name}: external power needs a console URL too")
            if opts.transport != "vhost-user" or opts.spec is not None:
                raise ConfigError(
                    f"{board.name}: --transport and specs shape the QEMU machines edgevirt "
                    "starts itself; a board powered from outside runs what it was set up with"
                )
            power = opts.power
        elif board.is_qemu:
            firmware, firmware_ram = qemu_firmware(board)
            self.machine = QemuMachine(
                board,
                self.build,
                firmware=firmware,
                firmware_ram=firmware_ram,
                tftp=self.uboot and self.tftp.get("server") == "qemu",
                ser2net=opts.ser2net,
                transport=opts.transport,
                spec=opts.spec,
                external=opts.external,
            )
            power = self.machine
        else:
            if opts.transport != "vhost-user":
                raise ConfigError(
                    f"{board.path}: transport {opts.transport!r} applies to QEMU boards "
                    "(a real board's devices are whatever its image and hypervisor provide)"
                )
            pw = self.raw.get("power", {})
            if pw.get("kind") == "qemu-model":
                self.model = QemuModel(board, self.build, pw)
                power = self.model
            else:
                power = board_power(board, opts.ask)
        self.power = power
        self.strategy: BootStrategy
        if chain == "fastboot":
            from edgevirt.deploy.fastboot import FastbootClient, FastbootStrategy, fastboot_settings

            fbs = fastboot_settings(board)
            self.strategy = FastbootStrategy(
                power,
                self._connect,
                FastbootClient(fbs.serial, timeout=fbs.timeout),
                fbs,
                self._boot_image,
                boot_timeout=opts.boot_timeout,
            )
        elif self.uboot:
            self.strategy = UBootStrategy(
                power,
                self._connect,
                self._load_and_boot,
                opts.uboot or _uboot_settings(board),
                boot_timeout=opts.boot_timeout,
            )
        else:
            self.strategy = BootStrategy(power, self._connect, boot_timeout=opts.boot_timeout)
        self.boot_seconds: float = 0.0

    # -- assembly -------------------------------------------------------------------------

    def _connect(self) -> Console:
        url = (
            self.opts.console_url
            or self.power.console_url
            or (self.board.console.url if self.board.console else None)
        )
        if not url:
            raise ConfigError(f"{self.board.where('console')}: no url for the board's console")
        baud = self.board.console.baudrate if self.board.console else 115200
        console = Console.open(
            url,
            log_path=self.build / "console.log",
            baudrate=baud,
            name=f"{self.opts.label or self.board.name} console",
        )
        if self.machine is not None:
            self.machine.connected()
        return console

    def prepare(self) -> None:
        """Images for the target: built or taken from ``--image``; staged for TFTP."""
        if self.machine is not None:
            self.images = self.machine.prepare(
                self.reporter,
                image_dir=self.opts.image_dir,
                restrict=self.opts.restrict,
                kernel_fragment=self.opts.kernel_fragment,
                fit=self.load == "fit",
            )
            return
        d = self.opts.image_dir
        if d is None and self.opts.power is not None and self.board.boot.chain == "direct":
            return  # a board powered from outside (a lab place) boots the images it holds
        if d is None and self.load in ("tftp", "fit"):
            raise DeployError(
                f"board {self.board.name}: pass --image DIR (Image, "
                "initramfs.cpio.gz, guest.dtb or guest.itb) for a load over TFTP"
            )
        self.images = prepare_board_images(
            self.board,
            self.build,
            self.reporter,
            image_dir=d,
            spec=self.opts.spec,
            kernel_fragment=self.opts.kernel_fragment,
        )
        if self.load == "sdcard":
            self.images.sdcard = self._write_card()
            if self.model is not None:
                self.model.sd_card = self.images.sdcard
            else:
                ask = self.opts.ask or no_operator
                ask(
                    f"write {self.images.sdcard} to the board's SD card "
                    f"(dd if={self.images.sdcard} of=/dev/sdX bs=4M conv=fsync), put it in"
                )
        if self.load in ("tftp", "fit"):
            assert d is not None
            dest = Path(get_key(self.tftp, "dir", str, self.board.where("tftp")))
            dest.mkdir(parents=True, exist_ok=True)
            names = (
                ["guest.itb"] if self.load == "fit" else ["Image", "initramfs.cpio.gz", "guest.dtb"]
            )
            for name in names:
                shutil.copyfile(d / name, dest / name)

    def _boot_image(self) -> Path:
        """The Android boot image for a fastboot board (kernel, initramfs, DTB, cmdline)."""
        from edgevirt.deploy.fastboot import fastboot_settings, write_boot_image

        assert self.images is not None
        out = self.build / "boot.img"
        if not out.exists():
            self.reporter.step("Android boot image: kernel + initramfs + DTB (header v2)")
            i = self.images
            layout = fastboot_settings(self.board).layout
            write_boot_image(out, i.kernel, i.initrd, i.dtb, self.bootargs(), layout)
        return out

    def _write_card(self) -> Path:
        from edgevirt.image.cpio import source_date_epoch
        from edgevirt.image.sdcard import card_layout, write_card

        assert self.images is not None
        self.reporter.step("SD card: MBR + FAT32 (Image, initramfs, guest.dtb, boot.scr, U-Boot)")
        layout = card_layout(
            self.board,
            kernel=self.images.kernel,
            initramfs=self.images.initrd,
            dtb=self.images.dtb,
            bootargs=self.bootargs(),
            script_out=self.build / "boot.scr",
            epoch=source_date_epoch(),
        )
        return write_card(layout, self.build / "sdcard.img")

    def _addr(self, key: str, default: int | None = None) -> int:
        bl = self.raw.get("bootloader", {})
        v = bl.get(f"{key}_addr_r", default)
        if v is None:
            raise ConfigError(
                f"{self.board.where('bootloader')}: {key}_addr_r is needed to load over {self.load}"
            )
        return int(v, 16) if isinstance(v, str) else int(v)

    def _bar(self, phase: str) -> Callable[[int, int], None]:
        return lambda done, total: self.reporter.progress(phase, done, total)

    def _lzma(self, u: UBoot) -> bool:
        """ymodem loads go compressed when the profile gives a window for it and this
        U-Boot has ``lzmadec``."""
        bl = self.raw.get("bootloader", {})
        return "kernel_comp_addr_r" in bl and u.has_command("lzmadec")

    def bootargs(self) -> str:
        con = self.board.console_kernel
        baud = self.board.console.baudrate if self.board.console else 115200
        return f"console={con},{baud} panic=-1"

    def _load_and_boot(self, u: UBoot, abort: Callable[[], None]) -> None:
        assert self.images is not None
        if self.load == "sdcard":
            # U-Boot's own distro boot (bootcmd) finds boot.scr on the card and runs it.
            self.reporter.step("U-Boot: boot from the SD card (distro boot → boot.scr)")
            u.boot("boot")
            return
        self.reporter.step(f"U-Boot: load over {self.load}, boot")
        u.setenv(initrd_high=NO_RELOCATE, fdt_high=NO_RELOCATE)
        u.check(f"setenv bootargs '{self.bootargs()}'")
        k, r, f = self._addr("kernel"), self._addr("ramdisk"), self._addr("fdt")
        if self.load in ("tftp", "fit"):
            server = self.tftp.get("server")
            ip = self.tftp.get("ipaddr", "dhcp")
            u.setenv(autoload="no")
            if server == "qemu" or ip == "dhcp":
                u.check("dhcp", 60, abort)
            else:
                u.setenv(ipaddr=ip)
            if server and server != "qemu":
                u.setenv(serverip=server)
        if self.load == "fit":
            fa = self._addr("fit")
            u.tftp(fa, "guest.itb", abort)
            u.boot(f"bootm {fa:#x}")
            return
        if self.load == "tftp":
            u.tftp(k, "Image", abort)
            rsize = u.tftp(r, "initramfs.cpio.gz", abort)
            u.tftp(f, "guest.dtb", abort)
        elif self._lzma(u):
            # Compressed over the line, decompressed by U-Boot; the initramfs goes as the
            # plain cpio it unpacks to (the kernel takes an uncompressed initramfs too).
            import gzip

            scratch = self._addr("kernel_comp")
            kernel = self.images.kernel.read_bytes()
            packed = lzma_alone(kernel, self.build / "Image.lzma")
            u.loady_lzma(k, packed, len(kernel), scratch, abort, self._bar("ymodem Image.lzma"))
            cpio = gzip.decompress(self.images.initrd.read_bytes())
            packed = lzma_alone(cpio, self.build / "initramfs.cpio.lzma")
            bar = self._bar("ymodem initramfs.cpio.lzma")
            rsize = u.loady_lzma(r, packed, len(cpio), scratch, abort, bar)
            u.loady(f, self.images.dtb, abort, self._bar("ymodem guest.dtb"))
        else:
            u.loady(k, self.images.kernel, abort, self._bar("ymodem Image"))
            rsize = u.loady(r, self.images.initrd, abort, self._bar("ymodem initramfs"))
            u.loady(f, self.images.dtb, abort, self._bar("ymodem guest.dtb"))
        u.boot(f"booti {k:#x} {r:#x}:{rsize:#x} {f:#x}")

    # -- use ------------------------------------------------------------------------------

    @property
    def console(self) -> Console:
        if self.strategy.console is None:
            raise DeployError(f"{self.board.name}: target is off (no console)")
        return self.strategy.console

    def transition(self, state: State | str) -> Console | None:
        return self.strategy.transition(state)

    def boot(self) -> Console:
        """Power on and bring the target to its shell; returns the console."""
        if self.images is None:
            self.prepare()
        self.reporter.step(f"boot {self.board.name} ({self.strategy.name})")
        t0 = time.monotonic()
        self.strategy.transition(State.SHELL)
        self.boot_seconds = time.monotonic() - t0
        return self.console

    def reboot(self) -> Console:
        self.strategy.power_off()
        return self.boot()

    def vars(self) -> dict[str, str]:
        """Values suites refer to as ``${name}``."""
        from edgevirt.smoke import smoke_vars

        v = {"board": self.board.name, "kernel_console": self.board.console_kernel}
        if self.board.is_qemu:
            q = self.board.qemu
            # A QEMU board powered from outside runs the default devices (machine.DEVICES).
            nodes = (
                self.images.nodes if self.images and self.images.nodes else mmio_nodes(len(DEVICES))
            )
            v |= smoke_vars(q.carveout_base, q.carveout, nodes)
        elif self.images is not None and self.images.carveout is not None:
            v |= smoke_vars(*self.images.carveout, [])
        return v

    def close(self) -> None:
        try:
            self.strategy.power_off()
        finally:
            self.power.close()

    def __enter__(self) -> Target:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
