"""pytest plugin: device tests in pytest, on a booted edgevirt target.

Enable with the ``pytest11`` entry point (installed with edgevirt) or ``-p edgevirt.pytest_plugin``.
Pick the board with ``--edgevirt-board NAME`` or ``EDGEVIRT_BOARD``, or a labgrid place with
``--edgevirt-place P`` (``EDGEVIRT_PLACE``; coordinator ``--edgevirt-coordinator`` or
``LG_COORDINATOR``; held for the session, released at its end); without either, tests that
use the fixtures are skipped (so a suite runs fine on a laptop with no board).

Fixtures:
    ``edgevirt_target``   session-wide :class:`~edgevirt.deploy.target.Target`, booted to its shell
                          and powered off at the end
    ``edgevirt_console``  its :class:`~edgevirt.console.expect.Console`; ``.run(cmd)`` gives
                          status and output

::

    def test_kernel(edgevirt_console):
        assert edgevirt_console.run("uname -r").output.startswith("6.")
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgevirt.console.expect import Console
from edgevirt.deploy.target import DeployOptions, Target


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("edgevirt", "edgevirt target")
    g.addoption("--edgevirt-board", default=None, help="Board to boot (or $EDGEVIRT_BOARD).")
    g.addoption("--edgevirt-build-dir", default=None, help="Artefacts and console log.")
    g.addoption(
        "--edgevirt-load",
        default=None,
        choices=["tftp", "fit", "ymodem"],
        help="U-Boot boards: how the images are loaded.",
    )
    g.addoption("--edgevirt-image", default=None, help="Directory with Image, initramfs, …")
    g.addoption("--edgevirt-place", default=None, help="labgrid place (or $EDGEVIRT_PLACE).")
    g.addoption(
        "--edgevirt-coordinator", default=None, help="labgrid coordinator (or $LG_COORDINATOR)."
    )


@pytest.fixture(scope="session")
def edgevirt_target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    from edgevirt.board import load_board

    opt = request.config.getoption
    name = opt("--edgevirt-board") or os.environ.get("EDGEVIRT_BOARD")
    place = opt("--edgevirt-place") or os.environ.get("EDGEVIRT_PLACE")
    if not name and not place:
        pytest.skip(
            "no edgevirt board configured (--edgevirt-board or EDGEVIRT_BOARD, "
            "--edgevirt-place or EDGEVIRT_PLACE)"
        )
    build = opt("--edgevirt-build-dir")
    image = opt("--edgevirt-image")
    opts = DeployOptions(
        Path(build) if build else tmp_path_factory.mktemp("edgevirt"),
        image_dir=Path(image) if image else None,
        load=opt("--edgevirt-load"),
    )
    if place:
        from edgevirt.lab import coordinator_address
        from edgevirt.lab.client import LabClient
        from edgevirt.lab.run import place_target

        address = coordinator_address(opt("--edgevirt-coordinator"))
        with (
            LabClient(address) as client,
            place_target(client, place, opts, board=name) as (
                _,
                target,
            ),
        ):
            target.boot()
            yield target
        return
    assert name is not None
    with Target(load_board(name), opts) as target:
        target.boot()
        yield target


@pytest.fixture
def edgevirt_console(edgevirt_target: Target) -> Console:
    return edgevirt_target.console
