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
