"""The CLI as a user runs it: help, JSON output, and dt compose checked by fdtoverlay."""

import json
import subprocess
import sys

from click.testing import CliRunner

from edgevirt.cli import cli


def test_help_lists_commands_and_examples():
    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0
    for word in ("up", "kernel", "backend", "dt", "Examples"):
        assert word in r.output


def test_usage_error_exit_2():
    r = CliRunner().invoke(cli, ["up", "--no-such-flag"])
    assert r.exit_code == 2


def test_unknown_board_exit_4(tmp_path):
    r = CliRunner().invoke(cli, ["dt", "compose", "--board", "nope", "-o", str(tmp_path)])
    assert r.exit_code == 4


def test_dt_compose_matches_fdtoverlay(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "edgevirt", "dt", "compose", "-o", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["carveout"] == {"base": "0x5c000000", "size": 64 << 20}
    assert info["nodes"] == ["/virtio_mmio@a003e00", "/virtio_mmio@a003c00"]
    subprocess.run(
        [
            "fdtoverlay",
            "-i",
            str(tmp_path / "qemu-virt.raw.dtb"),
            "-o",
            str(tmp_path / "oracle.dtb"),
            info["files"]["dtbo"],
        ],
        check=True,
    )

    def dts(path):
        return subprocess.run(
            ["dtc", "-I", "dtb", "-O", "dts", str(path)], capture_output=True, text=True, check=True
        ).stdout

    assert dts(tmp_path / "oracle.dtb") == dts(info["files"]["dtb"])
    text = dts(info["files"]["dtb"])
    assert 'compatible = "restricted-dma-pool"' in text
    assert text.count("memory-region = <") == 2
    # What QEMU is handed is compact: totalsize equals the file size (DESIGN §3).
    data = (tmp_path / "guest.dtb").read_bytes()
    assert int.from_bytes(data[4:8], "big") == len(data) < 64 * 1024


def test_up_offers_transport_backend_spec_and_servicevm_alias():
    r = CliRunner().invoke(cli, ["up", "--help"])
    assert r.exit_code == 0
    for word in ("--transport", "vhost-user|msg", "--backend", "host|service-vm", "--spec"):
        assert word in r.output, word
    r = CliRunner().invoke(cli, ["servicevm", "up", "--help"])
    assert r.exit_code == 0 and "Alias of `edgevirt up --transport msg --backend" in r.output
    r = CliRunner().invoke(cli, ["up", "--transport", "vhost-user", "--fault", "late-service"])
    assert r.exit_code == 4  # a service-VM fault without a service VM


def test_up_offers_every_service_vm_fault():
    from edgevirt.cli.up import FAULTS
    from edgevirt.servicevm.up import FAULTS as SERVICE_VM_FAULTS

    assert FAULTS == SERVICE_VM_FAULTS
    r = CliRunner().invoke(cli, ["up", "--help"])
    assert r.exit_code == 0 and "service-restart" in r.output
    r = CliRunner().invoke(cli, ["up", "--fault", "service-restart"])
    assert r.exit_code == 4  # the fault needs a service VM: --backend service-vm
    assert "applies to --backend service-vm only" in r.output


def test_progress_in_a_non_tty_log_is_a_line_per_tenth(capsys):
    """CI logs get progress lines (a bar they cannot redraw would print nothing for the
    eight minutes of a kernel build)."""
    from edgevirt.cli.common import RichReporter

    rep = RichReporter()
    for done in range(0, 3001, 7):
        rep.progress("compile", done, 3000)
    rep.progress("compile", 3000, 3000)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert [ln.split()[1] for ln in lines] == [f"{p}%" for p in range(0, 101, 10)], lines
    assert all(ln.strip().startswith("compile:") for ln in lines)
