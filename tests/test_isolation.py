"""The isolation proof's scanner output parser and plant commands (the end-to-end proofs
are in test_xen_e2e.py and test_servicevm_e2e.py)."""

from __future__ import annotations

from edgevirt.isolation import devmem_plant, parse_scan, scanner_module

XEN = """ram pages=98304 skipped=12 hits=0,0
passthrough carveout 0x3c000000-0x3e000000 hits=0,1
passthrough msgmem 0x3a000000-0x3a010000 hits=0,0
"""
QEMU = """ram pages=131072 skipped=0 hits=0,1
passthrough none
ivshmem 0000:00:04.0 0x10000000-0x12000000 hits=0,1
ivshmem 0000:00:05.0 0x12000000-0x12010000 hits=0,0
"""


def test_parse_xen_and_qemu_scans():
    x = parse_scan(XEN)
    assert x is not None and x.pages == 98304 and x.unmapped == 12 and x.ram_hits == (0, 0)
    assert [(k, n, h) for k, n, _a, _b, h in x.regions] == [
        ("passthrough", "carveout", (0, 1)), ("passthrough", "msgmem", (0, 0))]  # fmt: skip
    q = parse_scan(QEMU)
    assert q is not None and q.ram_hits == (0, 1)
    assert [(k, a, b) for k, _n, a, b, _h in q.regions] == [
        ("ivshmem", 0x10000000, 0x12000000), ("ivshmem", 0x12000000, 0x12010000)]  # fmt: skip


def test_a_scan_without_shared_regions_or_ram_is_refused():
    """No region scanned is no proof: the check must fail, not pass on zero hits."""
    assert parse_scan("ram pages=5 skipped=0 hits=0,0\npassthrough none\n") is None
    assert parse_scan("no pattern: write its inverted hex first\n") is None
    assert parse_scan("ivshmem 0000:00:04.0 0x1-0x2 hits=0,1\n") is None


class _Fe:
    """A front-end shell that runs the plant's commands for real, with devmem recorded."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.cmds: list[str] = []

    def run(self, cmd: str, timeout: float):
        import subprocess

        self.cmds.append(cmd)
        cmd = cmd.replace("/tmp/", f"{self.tmp}/")
        subprocess.run(["sh", "-c", "devmem() { echo \"$1 $2 $3\" >> devmem.log; }; " + cmd],
                       cwd=self.tmp, check=True, timeout=10)  # fmt: skip


def test_devmem_plant_writes_the_guests_file_word_by_word_and_wipes_it(tmp_path):
    fe = _Fe(tmp_path)
    secret = bytes(range(64))
    (tmp_path / "shared-secret").write_bytes(secret)
    where, wipe = devmem_plant(0x3DFFF000)(fe)  # type: ignore[arg-type]
    assert where == "guest 0x3dfff000"
    writes = (tmp_path / "devmem.log").read_text().split("\n")[:8]
    # the shell's $((…)) prints decimal; devmem takes it; each word little-endian as od -tx8
    assert writes[0] == f"{0x3DFFF000} 64 0x0706050403020100"
    assert writes[7] == f"{0x3DFFF038} 64 0x3f3e3d3c3b3a3938"
    fe.run(wipe, 10)
    wiped = (tmp_path / "devmem.log").read_text().split("\n")[8:16]
    assert [w.split()[2] for w in wiped] == ["0"] * 8


def test_the_scanner_module_source_ships():
    assert (scanner_module() / "ev_scan.c").is_file() and (scanner_module() / "Kbuild").is_file()
