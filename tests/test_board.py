"""Board profiles: the shipped ones load; malformed ones name file and key."""

import pytest

from edgevirt.board import load_board, parse_size
from edgevirt.errors import ConfigError


def test_default_board_loads():
    b = load_board("qemu-virt")
    assert b.qemu.ram == 448 << 20 and b.qemu.carveout == 64 << 20
    assert b.qemu.carveout_base == 0x5C000000  # node 1 follows node 0 (DESIGN §3)


@pytest.mark.parametrize(
    "text,expect",
    [("64M", 64 << 20), ("1G", 1 << 30), ("0x1000", 4096), (4096, 4096), ("2MiB", 2 << 20)],
)
def test_parse_size(text, expect):
    assert parse_size(text, "x") == expect


@pytest.mark.parametrize("bad", ["lots", "", "-5M", True, 0])
def test_parse_size_rejects(bad):
    with pytest.raises(ConfigError, match="where"):
        parse_size(bad, "where")


def write(tmp_path, text):
    p = tmp_path / "b.toml"
    p.write_text(text)
    return str(p)


def test_unknown_board_lists_known():
    with pytest.raises(ConfigError, match="known boards: .*qemu-virt"):
        load_board("no-such-board")


def test_missing_key_named(tmp_path):
    with pytest.raises(ConfigError, match=r"b.toml: \[qemu\]: missing key 'machine'"):
        load_board(
            write(tmp_path, 'name="x"\n[qemu]\nram="64M"\ncarveout="2M"\n[console]\nkernel="t"\n')
        )


def test_wrong_type_named(tmp_path):
    with pytest.raises(ConfigError, match=r"\[qemu\].smp: expected int, got str"):
        load_board(
            write(
                tmp_path,
                'name="x"\n[qemu]\nmachine="virt"\nsmp="2"\nram="64M"\n'
                'carveout="2M"\n[console]\nkernel="t"\n',
            )
        )


def test_misaligned_carveout(tmp_path):
    with pytest.raises(ConfigError, match="carveout: 0x100000 is not a multiple of 0x200000"):
        load_board(
            write(
                tmp_path,
                'name="x"\n[qemu]\nmachine="virt"\nram="64M"\ncarveout="1M"\n'
                '[console]\nkernel="t"\n',
            )
        )


def test_toml_syntax_error_names_file(tmp_path):
    with pytest.raises(ConfigError, match="b.toml"):
        load_board(write(tmp_path, "name = \n"))


# -- the extended schema: every shipped board, and each key's error ----------------------

REAL_BOARD = """name = "x"
soc = "s"
[dt]
source = "kernel:renesas/r8a77951-salvator-xs.dtb"
spi_range = [224, 239]
[[ram]]
base = 0x48000000
size = "896M"
[console]
kernel = "ttySC0"
url = "/dev/ttyUSB0"
[bootloader]
kind = "u-boot"
kernel_addr_r = 0x48080000
fdt_addr_r = "0x48000000"
fdt_size = "512K"
"""


@pytest.mark.parametrize("name", __import__("edgevirt.board").board.list_boards())
def test_every_shipped_board_loads(name):
    b = load_board(name)
    assert b.name == name and b.console is not None and b.console.kernel
    if b.is_qemu:
        assert b.dt.source == "qemu-dumpdtb" or b.dt.kind in ("kernel", "file")
    else:
        assert b.dt.kind == "kernel" and b.boot.driven
        assert (b.bootloader is not None) == (b.boot.chain == "u-boot")
        # A console: the board's own line, or the QEMU model standing in for it.
        assert b.console.url or b.raw["power"]["kind"] == "qemu-model"
        with pytest.raises(ConfigError, match="has no \\[qemu\\] section"):
            _ = b.qemu
    # Every profile says how the board really boots, in order (qemu-virt: QEMU itself).
    assert b.boot.chain in ("direct", "u-boot", "fastboot")
    assert b.boot.stages or b.is_qemu


@pytest.mark.parametrize(
    "extra,message",
    [
        ('[boot]\nchain = "grub"\n', r"\[boot\].chain: unknown boot chain 'grub'; expected one of"),
        ('[boot]\nchain = "fastboot"\n', r"'fastboot' needs a \[fastboot\] section"),
        ('[boot]\nchain = "direct"\n', r"'direct', but the profile has a \[bootloader\]"),
        ('[boot]\nchain = "u-boot"\nstages = ["ROM", ""]\n', r"\[boot\].stages: expected a list"),
        ('[boot]\nchain = "u-boot"\ncolour = 1\n', r"\[boot\]: unknown key\(s\) colour"),
    ],
)
def test_boot_chain_is_checked_when_loaded(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message) as exc:
        load_board(write(tmp_path, REAL_BOARD + extra))
    assert "b.toml" in str(exc.value)


def test_boot_chain_defaults_and_undriven_chain(tmp_path):
    b = load_board(write(tmp_path, REAL_BOARD))
    assert b.boot.chain == "u-boot" and b.boot.driven
    text = REAL_BOARD.split("[bootloader]")[0] + '[boot]\nchain = "uefi"\nstages = ["edk2"]\n'
    b = load_board(write(tmp_path, text))
    assert b.boot.chain == "uefi" and not b.boot.driven


def test_real_board_dataclasses(tmp_path):
    b = load_board(write(tmp_path, REAL_BOARD))
    assert b.qemu_settings is None and b.dt.argument == "renesas/r8a77951-salvator-xs.dtb"
    assert b.dt.spi_range == (224, 239) and b.ram[0].end == 0x48000000 + (896 << 20)
    assert b.console.url == "/dev/ttyUSB0" and b.console.baudrate == 115200
    bl = b.bootloader
    assert bl.kind == "u-boot" and bl.prompt == "=> " and bl.fdt_addr_r == 0x48000000
    assert [(ld.name, ld.size) for ld in bl.loads] == [
        ("kernel_addr_r", 64 << 20),
        ("fdt_addr_r", 512 << 10),
    ]
    assert b.raw["dt"]["source"].startswith("kernel:")  # other layers read Board.raw


@pytest.mark.parametrize(
    "old,new,message",
    [
        ('soc = "s"', 'soc = "s"\ncolour = "red"', r"unknown key\(s\) colour"),
        ('source = "kernel:renesas', 'source = "tftp:renesas', r"\[dt\].source: expected"),
        ("spi_range = [224, 239]", "spi_range = [239, 224]", r"spi_range: expected \[first"),
        ('url = "/dev/ttyUSB0"', 'url = "http://x"', r"\[console\].url: expected a serial"),
        ("kernel_addr_r = 0x48080000", "", r"\[bootloader\]: missing key 'kernel_addr_r'"),
        ('kind = "u-boot"', 'kind = "grub"', r"\[bootloader\].kind: expected 'u-boot'"),
        ('fdt_addr_r = "0x48000000"', 'fdt_addr_r = "high"', r"fdt_addr_r: expected an address"),
        ('size = "896M"', 'size = "896M"\n[[ram]]\nbase = 0x50000000\nsize = "1G"', "overlaps"),
        ('source = "kernel:renesas', 'source = "qemu-dumpdtb"\n#', "needs a \\[qemu\\] section"),
    ],
)
def test_board_schema_errors_name_file_and_key(tmp_path, old, new, message):
    assert old in REAL_BOARD
    with pytest.raises(ConfigError, match=message) as exc:
        load_board(write(tmp_path, REAL_BOARD.replace(old, new)))
    assert "b.toml" in str(exc.value)


def test_bootloader_autoboot_keys_reach_the_uboot_driver(tmp_path):
    from edgevirt.deploy.target import _uboot_settings

    p = tmp_path / "b.toml"
    p.write_text(
        'name = "x"\n[qemu]\nmachine = "virt"\nram = "448M"\ncarveout = "64M"\n'
        '[console]\nkernel = "ttyAMA0"\n'
        '[bootloader]\nkind = "u-boot"\nkernel_addr_r = 0x40400000\n'
        'autoboot = "Press SPACE to abort autoboot"\ninterrupt = " "\nretries = 4\n'
    )
    s = _uboot_settings(load_board(str(p)))
    assert (s.autoboot, s.interrupt, s.retries) == ("Press SPACE to abort autoboot", " ", 4)


@pytest.mark.parametrize(
    "line, expect",
    [("", None), ("loady_baudrate = 921600\n", 921600),
     ("loady_baudrate = 92160\n", "loady_baudrate: 92160 is not a UART rate"),
     ("loady_baudrate = \"fast\"\n", "loady_baudrate")],
)  # fmt: skip
def test_loady_baudrate_is_read_and_checked(tmp_path, line, expect):
    from edgevirt.deploy.target import _uboot_settings

    p = tmp_path / "b.toml"
    p.write_text(
        'name = "x"\n[qemu]\nmachine = "virt"\nram = "448M"\ncarveout = "64M"\n'
        '[console]\nkernel = "ttyAMA0"\n'
        '[bootloader]\nkind = "u-boot"\nkernel_addr_r = 0x40400000\n' + line
    )
    if isinstance(expect, str):
        with pytest.raises(ConfigError, match=expect) as e:
            _uboot_settings(load_board(str(p)))
        assert "b.toml" in str(e.value)
    else:
        assert _uboot_settings(load_board(str(p))).loady_baudrate == expect
