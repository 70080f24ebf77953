"""The fastboot chain: boot images (mkbootimg as the oracle) and Debian's real ``fastboot``
client against edgevirt's fake TCP device: success, a device answering FAIL, a silent one."""

import json
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from edgevirt.board import load_board
from edgevirt.deploy.fastboot import FastbootClient, FastbootError
from edgevirt.deploy.fastboot_device import FakeFastbootDevice
from edgevirt.deploy.strategy import State
from edgevirt.deploy.target import ChainNotDriven, DeployOptions, Target
from edgevirt.errors import ConfigError, ImageError
from edgevirt.image.bootimg import BootImgLayout, parse_bootimg, write_bootimg
from tests.helpers import leftovers

needs_fastboot = pytest.mark.skipif(not shutil.which("fastboot"), reason="fastboot not installed")

# A kernel with the arm64 Image magic at offset 56, a DTB with the FDT magic.
KERNEL = bytes(56) + b"ARM\x64" + bytes(range(256)) * 300
DTB = b"\xd0\x0d\xfe\xed" + bytes(4000)
RAMDISK = b"\x1f\x8b" + bytes(range(200)) * 50


@pytest.mark.skipif(not shutil.which("mkbootimg"), reason="mkbootimg not installed")
@pytest.mark.parametrize("version", [0, 1, 2])
@pytest.mark.parametrize("page", [2048, 4096])
def test_boot_image_is_byte_identical_to_mkbootimg(tmp_path, version, page):
    files = {"kernel": KERNEL, "ramdisk": RAMDISK, "dtb": DTB}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    cmdline = "console=ttyMSM0,115200 panic=-1 " + "x" * (600 if version == 2 else 10)
    args = ["--kernel", "kernel", "--ramdisk", "ramdisk", "--cmdline", cmdline]
    args += ["--base", "0x80000000", "--pagesize", str(page), "--header_version", str(version)]
    args += ["--board", "sa8155p"] + (["--dtb", "dtb"] if version == 2 else [])
    subprocess.run(["mkbootimg", *args, "-o", "ref.img"], cwd=tmp_path, check=True)
    lay = BootImgLayout(base=0x80000000, page_size=page, header_version=version, board="sa8155p")
    write_bootimg(
        tmp_path / "mine.img",
        kernel=KERNEL,
        ramdisk=RAMDISK,
        dtb=DTB if version == 2 else b"",
        cmdline=cmdline,
        layout=lay,
    )
    assert (tmp_path / "mine.img").read_bytes() == (tmp_path / "ref.img").read_bytes()
    img = parse_bootimg((tmp_path / "ref.img").read_bytes())
    assert (img.kernel, img.ramdisk, img.cmdline) == (KERNEL, RAMDISK, cmdline)
    assert img.dtb == (DTB if version == 2 else b"") and img.kernel_addr == 0x80008000


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda b: b"XNDROID!" + b[8:], "no ANDROID! magic"),
        (lambda b: b[:40] + struct.pack("<I", 7) + b[44:], "header_version 7"),
        (lambda b: b[:36] + struct.pack("<I", 1000) + b[40:], "page_size 1000"),
        (lambda b: b[:8] + struct.pack("<I", 1 << 30) + b[12:], "kernel of 1073741824 bytes"),
        (lambda b: b[:6000], "runs past the end"),
    ],
)
def test_bad_boot_images_are_refused_with_the_field(tmp_path, mutate, message):
    good = write_bootimg(tmp_path / "b.img", kernel=KERNEL, ramdisk=RAMDISK, dtb=DTB)
    with pytest.raises(ImageError, match=message):
        parse_bootimg(mutate(good.read_bytes()))


def test_layout_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"x.page_size: 1000"):
        BootImgLayout.from_table({"page_size": 1000}, "x")
    with pytest.raises(ConfigError, match=r"x: unknown key\(s\) pagesize"):
        BootImgLayout.from_table({"pagesize": 4096}, "x")


@pytest.fixture
def boot_img(tmp_path: Path) -> Path:
    return write_bootimg(
        tmp_path / "boot.img", kernel=KERNEL, ramdisk=RAMDISK, dtb=DTB, cmdline="console=ttyS0"
    )


@needs_fastboot
def test_real_fastboot_client_boots_on_the_fake_device(boot_img):
    with FakeFastbootDevice() as dev:
        client = FastbootClient(dev.serial, timeout=20)
        assert client.getvar("product") == "sa8155p-adp"
        client.boot(boot_img)
        assert dev.commands[-2:] == [f"download:{boot_img.stat().st_size:08x}", "boot"]
        assert dev.booted is not None and dev.booted["cmdline"] == "console=ttyS0"
        assert dev.booted["kernel"]["size"] == len(KERNEL)
        assert dev.booted["kernel_kind"] == "arm64 Image"
        client.flash("boot", boot_img)
        assert dev.flashed == {"boot_a": boot_img.stat().st_size}


@needs_fastboot
def test_device_refusing_a_bad_image_is_a_clear_error(tmp_path):
    bad = write_bootimg(tmp_path / "bad.img", kernel=b"not a kernel" * 100, dtb=DTB)
    with FakeFastbootDevice() as dev:
        with pytest.raises(FastbootError, match="answered FAIL: boot: kernel is neither"):
            FastbootClient(dev.serial, timeout=20).boot(bad)
        assert dev.booted is None


@needs_fastboot
def test_device_answering_fail(boot_img):
    with FakeFastbootDevice(mode="fail", fail_message="partition table locked") as dev:
        client = FastbootClient(dev.serial, timeout=20)
        # fastboot itself exits 0 on a FAILed getvar: the error comes from its output.
        with pytest.raises(FastbootError, match=r"getvar product: .* answered FAIL: partition"):
            client.getvar("product")
        with pytest.raises(FastbootError, match="answered FAIL: partition table locked"):
            client.boot(boot_img)


@needs_fastboot
def test_silent_device_times_out_and_leaves_nothing_running(boot_img):
    with FakeFastbootDevice(mode="silent") as dev:
        client = FastbootClient(dev.serial, timeout=2)
        t0 = time.monotonic()
        with pytest.raises(FastbootError, match=r"no answer from tcp:127.0.0.1:\d+ within 2s"):
            client.boot(boot_img)
        assert time.monotonic() - t0 < 6
        assert not leftovers(dev.serial)  # the fastboot client was killed, not left hanging


def fastboot_board(tmp_path: Path, serial: str, extra: str = "") -> Path:
    """The SA8155P profile with its console on loop:// and power by commands (no board)."""
    text = (Path(load_board("qcom-sa8155p-adp").path)).read_text()
    text = text.replace('url = "/dev/ttyUSB0"', 'url = "loop://"')
    text = text.replace("[fastboot]\n", f'[fastboot]\nserial = "{serial}"\n')
    if extra:
        text = text.replace("enter_timeout = 90\n", extra)
    text += '\n[power]\nkind = "command"\non = "true"\noff = "true"\n'
    p = tmp_path / "adp.toml"
    p.write_text(text)
    return p


@needs_fastboot
def test_target_drives_the_fastboot_chain_to_the_kernel(tmp_path):
    """Board → bootloader (device answers) → kernel (boot image built and sent)."""
    state = tmp_path / "fake.json"
    with FakeFastbootDevice(state_file=state) as dev:
        board = load_board(str(fastboot_board(tmp_path, dev.serial)))
        img = tmp_path / "img"
        img.mkdir()
        (img / "Image").write_bytes(KERNEL)
        (img / "initramfs.cpio.gz").write_bytes(RAMDISK)
        dtb = subprocess.run(
            ["dtc", "-I", "dts", "-O", "dtb"],
            input=b'/dts-v1/;\n/ { model = "fake"; };\n',
            capture_output=True,
            check=True,
        ).stdout
        (img / "guest.dtb").write_bytes(dtb)
        with Target(board, DeployOptions(tmp_path / "b", image_dir=img)) as t:
            assert t.load == "fastboot" and t.strategy.name == "fastboot"
            t.prepare()
            t.transition(State.BOOTLOADER)
            assert t.strategy.product == "sa8155p-adp"  # type: ignore[attr-defined]
            t.transition(State.KERNEL)
        booted = json.loads(state.read_text())["booted"]
        assert booted["cmdline"] == "console=ttyMSM0,115200 panic=-1"
        assert booted["dtb"]["size"] == len(dtb) and booted["page_size"] == 4096
        assert parse_bootimg((tmp_path / "b" / "boot.img").read_bytes()).kernel == KERNEL


@needs_fastboot
def test_no_device_in_fastboot_mode_names_what_to_do(tmp_path):
    board = load_board(str(fastboot_board(tmp_path, "tcp:127.0.0.1:9", "enter_timeout = 2\n")))
    with Target(board, DeployOptions(tmp_path / "b")) as t:
        with pytest.raises(FastbootError, match="did not show up in fastboot mode within 2s"):
            t.transition(State.BOOTLOADER)


def test_undriven_chain_is_refused_before_anything_starts(tmp_path):
    text = load_board("rpi4b").path.read_text()
    text = text.split("[bootloader]")[0].replace('chain = "u-boot"', 'chain = "uefi"')
    p = tmp_path / "efi.toml"
    p.write_text(text)
    with pytest.raises(ChainNotDriven, match=r"chain = 'uefi': edgevirt does not drive") as e:
        Target(load_board(str(p)), DeployOptions(tmp_path / "b"))
    assert "EFI system partition" in (e.value.hint or "")


def test_load_options_of_uboot_are_refused_for_fastboot(tmp_path):
    board = load_board(str(fastboot_board(tmp_path, "tcp:127.0.0.1:9")))
    with pytest.raises(ConfigError, match="--load ymodem is for U-Boot boards"):
        Target(board, DeployOptions(tmp_path / "b", load="ymodem"))


def test_inspect_recognises_a_boot_image(boot_img):
    from edgevirt.image.inspect import inspect_path

    info = inspect_path(boot_img)
    assert info["kind"] == "android-boot-image" and info["kernel_kind"] == "arm64 Image"
    assert info["cmdline"] == "console=ttyS0" and info["dtb"]["size"] == len(DTB)
