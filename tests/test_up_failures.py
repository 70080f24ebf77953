"""Bad input and broken components: one clear message, non-zero exit, no leftovers."""

import pytest

from edgevirt.errors import ImageError
from edgevirt.image import kernel as kernel_mod
from tests.helpers import edgevirt, flat, leftovers


def board_file(tmp_path, **qemu):
    fields = {"machine": '"virt"', "cpu": '"cortex-a57"', "ram": '"448M"', "carveout": '"64M"'}
    fields.update({k: f'"{v}"' for k, v in qemu.items()})
    body = "\n".join(f"{k} = {v}" for k, v in fields.items())
    p = tmp_path / "board.toml"
    p.write_text(f'name = "qemu-virt"\n[qemu]\n{body}\n[console]\nkernel = "ttyAMA0"\n')
    return str(p)


def test_missing_host_tool_exit_3_with_hint(tmp_path):
    r = edgevirt(
        "up",
        "--board",
        board_file(tmp_path, binary="qemu-system-nonexistent"),
        "--build-dir",
        str(tmp_path / "b"),
    )
    assert r.returncode == 3
    assert "qemu-system-nonexistent not found" in flat(r.stderr)
    assert "make setup" in flat(r.stderr)


@pytest.mark.e2e
def test_qemu_refusing_to_start_is_quoted(tmp_path):
    r = edgevirt(
        "up", "--board", board_file(tmp_path, cpu="no-such-cpu"), "--build-dir", str(tmp_path / "b")
    )
    assert r.returncode == 1
    assert "no-such-cpu" in flat(r.stderr) and "QEMU" in flat(r.stderr)
    assert not leftovers(str(tmp_path))


@pytest.mark.e2e
def test_guest_that_never_reaches_agent_times_out_with_last_lines(tmp_path):
    # 0.3 s is shorter than the boot: the wait must end with the console's last words.
    r = edgevirt("up", "--build-dir", str(tmp_path / "b"), "--boot-timeout", "0.3")
    assert r.returncode == 1
    assert "did not appear within 0s" in flat(r.stderr)
    assert "last console lines" in flat(r.stderr)
    assert not leftovers(str(tmp_path))


def test_backend_socket_that_cannot_be_created(tmp_path):
    r = edgevirt("backend", "run", "--device", "rng", "--socket-dir", "/proc/edgevirt-nope")
    assert r.returncode == 3
    assert "/proc/edgevirt-nope" in r.stderr
    long_dir = tmp_path / ("d" * 120)
    r = edgevirt("backend", "run", "--device", "rng", "--socket-dir", str(long_dir))
    assert r.returncode == 1
    assert "cannot listen on" in flat(r.stderr) and "too long" in flat(r.stderr)


def test_backend_bad_device_spec_is_config_error(tmp_path):
    r = edgevirt("backend", "run", "--device", "tpm", "--socket-dir", str(tmp_path))
    assert r.returncode == 4
    assert "unknown kind 'tpm'" in r.stderr
    r = edgevirt(
        "backend",
        "run",
        "--device",
        f"blk:path={tmp_path}/absent.img",
        "--socket-dir",
        str(tmp_path),
    )
    assert r.returncode == 1 and "absent.img" in r.stderr


def test_failed_kernel_make_names_the_log(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "Makefile").write_text(
        "Image:\n\t@echo '  CC      init/main.o'\n\t@echo 'main.c:1: error: boom' >&2; exit 2\n"
    )
    with open(tmp_path / "build.log", "w") as logf, pytest.raises(ImageError) as ei:
        kernel_mod._make(src, ["Image"], logf, None, 10)
    assert "failed (exit 2)" in str(ei.value) and "build.log" in str(ei.value)
    assert "error: boom" in (tmp_path / "build.log").read_text()


def test_fragment_option_dropped_by_olddefconfig_is_reported():
    config = "CONFIG_VIRTIO=y\n# CONFIG_DMA_RESTRICTED_POOL is not set\n"
    with pytest.raises(ImageError, match=r"CONFIG_DMA_RESTRICTED_POOL=y \(got n\)"):
        kernel_mod.check_config(
            config, {"CONFIG_VIRTIO": "y", "CONFIG_DMA_RESTRICTED_POOL": "y"}, "frag"
        )


def test_fragment_syntax_error_names_line():
    with pytest.raises(ImageError, match="frag:2: expected CONFIG_NAME=value"):
        kernel_mod.parse_fragment("CONFIG_A=y\nA=y\n", "frag")


def test_cache_key_follows_fragment(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("CONFIG_A=y\n")
    b.write_text("CONFIG_A=n\n")
    assert kernel_mod.cache_key(a) != kernel_mod.cache_key(b)
    assert kernel_mod.cache_key(a) == kernel_mod.cache_key(a)


def test_a_host_build_error_is_reported_as_the_hosts(tmp_path, monkeypatch):
    """A failure while building images is the host's, not a VM's (issue: service-VM runs on
    a fresh machine said `FAILED (front-end VM)` with an empty table)."""
    from edgevirt.deploy.machine import QemuMachine
    from edgevirt.up import UpOptions, up

    def broken(self, *a, **kw):  # type: ignore[no-untyped-def]
        raise ImageError("modules: make failed (exit 2)")

    monkeypatch.setattr(QemuMachine, "prepare", broken)
    result = up(UpOptions(tmp_path / "b"))
    assert not result.ok
    assert result.failed_vm == "host"
    assert result.error.startswith("host build failed: modules: make failed")
    assert (tmp_path / "b/result.json").read_text().count('"failed_vm": "host"') == 1


def test_cross_compile_without_the_arm64_libc_is_a_setup_error_naming_the_package(
    tmp_path, monkeypatch
):
    from edgevirt import hostreqs
    from edgevirt.errors import SetupError
    from edgevirt.image import python_cross

    real = hostreqs.requirement(hostreqs.ARM64_LIBC)
    missing = hostreqs.Requirement(
        real.name,
        real.feature,
        real.package,
        lambda: (False, "stdio.h:27:10: fatal error: bits/libc-header-start.h: No such file"),
        real.why,
    )
    monkeypatch.setattr(hostreqs, "requirement", lambda name: missing)
    src = tmp_path / "x.c"
    src.write_text("int x;\n")
    with pytest.raises(SetupError) as ei:
        python_cross.cross_compile_extension([src], tmp_path, tmp_path / "x.so")
    assert "host build" in str(ei.value) and "libc-header-start.h" in str(ei.value)
    assert "libc6-dev-arm64-cross" in (ei.value.hint or "")
