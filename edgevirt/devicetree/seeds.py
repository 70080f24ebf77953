"""Per-boot secrets in ``/chosen``: never frozen into a DTB that edgevirt writes.

QEMU's ``dumpdtb`` writes a random ``rng-seed`` and ``kaslr-seed`` on every run. Shipped as
they are, every boot of that DTB would get the same entropy seed and KASLR offset, and no two
builds would be byte-identical. They are zeroed (size kept); the loader fills them at boot:
QEMU (hw/arm/boot.c) re-randomises every ``rng-seed`` of the DTB it loads on each reset, and a
``kaslr-seed`` of 0 means "none" to Linux, which U-Boot's booti/``kaslrseed`` or the kernel's
own RNG sources replace.
"""

from __future__ import annotations

from edgevirt.devicetree.fdt import Fdt, Property

BOOT_SEEDS = ("rng-seed", "kaslr-seed")


def zero_boot_seeds(fdt: Fdt) -> Fdt:
    """Zero the seeds in ``/chosen`` in place (their size kept); returns ``fdt``."""
    chosen = fdt.find("/chosen")
    if chosen is not None:
        for name in BOOT_SEEDS:
            prop = chosen.get(name)
            if prop is not None:
                chosen.set(Property(name, bytes(len(prop.value))))
    return fdt
