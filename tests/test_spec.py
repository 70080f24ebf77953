"""The system spec: the shipped example loads; malformed specs name file, key, expectation."""

import pytest

from edgevirt.errors import ConfigError
from edgevirt.paths import PROJECT_ROOT
from edgevirt.spec import load_spec

GOOD = """name = "s"
[[vm]]
name = "guest"
role = "frontend"
[[vm]]
name = "service"
role = "service"
[[carveout]]
name = "shared"
size = "64M"
placement = "auto"
[msg]
doorbell = 0x0c000000
[[device]]
type = "blk"
transport = "mmio"
[[device]]
type = "rng"
transport = "msg"
"""


def write(tmp_path, text):
    p = tmp_path / "s.toml"
    p.write_text(text)
    return p


def test_shipped_example_and_defaults(tmp_path):
    spec = load_spec(PROJECT_ROOT / "devicetree" / "specs" / "qemu-virt-msg.toml")
    assert [v.role for v in spec.vms] == ["frontend", "service"]
    s = load_spec(write(tmp_path, GOOD))
    (c,) = s.carveouts
    assert (c.size, c.placement, c.align, c.pool, c.vm) == (
        64 << 20,
        None,
        2 << 20,
        "restricted-dma-pool",
        "guest",
    )
    assert [(d.type, d.virtio_id, d.transport, d.carveout) for d in s.devices] == [
        ("blk", 2, "mmio", "shared"),
        ("rng", 4, "msg", "shared"),
    ]
    assert s.msg is not None and s.msg.ring_bytes == 0x3000  # 2 x (64 + 64 x 64), page-rounded


def test_minimal_spec_gets_one_frontend(tmp_path):
    s = load_spec(write(tmp_path, '[carveout]\nsize = "8M"\nplacement = 0x50000000\n'))
    assert [v.name for v in s.vms] == ["guest"] and s.carveouts[0].placement == 0x50000000


@pytest.mark.parametrize(
    "old,new,message",
    [
        ('name = "s"', 'name = "s"\nvms = 2', r"unknown key\(s\) vms"),
        ('role = "service"', 'role = "backend"', r"\[\[vm\]\]\[1\].role: expected one of"),
        ('name = "service"', 'name = "guest"', "VM 'guest' is defined twice"),
        ('size = "64M"', 'size = "lots"', r"\[\[carveout\]\]\[0\].size: expected a size"),
        ('placement = "auto"', 'placement = "top"', r"placement \(or \"auto\"\)"),
        ('placement = "auto"', "placement = 0x5c100000", "not aligned to align 0x200000"),
        ('size = "64M"', 'size = "3M"', "0x300000 is not a multiple of align 0x200000"),
        ('placement = "auto"', 'align = "3K"', "align: expected a power of two"),
        ('transport = "mmio"', 'transport = "pci"', "transport: expected 'mmio' or 'msg'"),
        ('type = "blk"', 'type = "toaster"', "unknown virtio device 'toaster'"),
        ("doorbell = 0x0c000000", "doorbell = 0x0c000800", "not 0x1000-aligned"),
        ("[msg]\ndoorbell = 0x0c000000\n", "", "need a \\[msg\\] table"),
        ('transport = "msg"', 'transport = "msg"\nnode = "/x"', "apply to transport 'mmio'"),
        ('transport = "mmio"', 'transport = "mmio"\ncarveout = "x"', "carve-out of VM 'guest'"),
        ('name = "guest"\nrole = "frontend"', 'name = "g"\nrole = "service"', "at least one VM"),
    ],
)
def test_spec_errors_name_file_key_and_expectation(tmp_path, old, new, message):
    assert old in GOOD
    with pytest.raises(ConfigError, match=message) as exc:
        load_spec(write(tmp_path, GOOD.replace(old, new, 1)))
    assert "s.toml" in str(exc.value)


def test_missing_spec_file(tmp_path):
    with pytest.raises(ConfigError, match="system spec .* not found"):
        load_spec(tmp_path / "nope.toml")


IVSHMEM = """name = "q"
backend = "service-vm"
[[carveout]]
size = "64M"
[msg]
doorbell = "ivshmem-pci"
[[device]]
type = "blk"
transport = "msg"
[[device]]
type = "rng"
transport = "msg"
"""


def test_ivshmem_pci_doorbell_mode(tmp_path):
    s = load_spec(write(tmp_path, IVSHMEM))
    assert s.backend == "service-vm" and s.transports == ["msg"]
    assert s.msg is not None and s.msg.mode == "ivshmem-pci" and s.msg.doorbell is None
    # the message memory is the PCI BAR: nothing is taken off the carve-out
    assert s.msg.ring_bytes == 0
    assert (s.msg.ring_slots, s.msg.slot_size) == (64, 264)


def test_ivshmem_pci_geometry_matches_the_message_memory():
    from edgevirt.backend.transport.virtio_msg import channel
    from edgevirt.deploy.system_dt import DEFAULT_SLOTS
    from edgevirt.spec import IVSHMEM_SLOT_SIZE

    assert IVSHMEM_SLOT_SIZE == channel.SLOT_SIZE
    assert DEFAULT_SLOTS == channel.DEFAULT_SLOTS


@pytest.mark.parametrize(
    "edit, message",
    [
        (('backend = "service-vm"', 'backend = "cloud"'), "backend: expected one of host"),
        (('doorbell = "ivshmem-pci"', 'doorbell = "pci"'), 'an address or "ivshmem-pci"'),
        (
            ('doorbell = "ivshmem-pci"', 'doorbell = "ivshmem-pci"\ndoorbell_size = 4096'),
            "no doorbell window with 'ivshmem-pci'",
        ),
    ],
)
def test_ivshmem_and_backend_errors(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message):
        load_spec(write(tmp_path, IVSHMEM.replace(*edit)))
