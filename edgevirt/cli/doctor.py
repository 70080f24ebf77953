"""`edgevirt doctor`: what this host has and lacks, per feature, with the package to install."""

from __future__ import annotations

import json
import sys

import click
from rich.markup import escape
from rich.table import Table

from edgevirt.cli.common import EXIT_OK, EXIT_SETUP, err, out
from edgevirt.hostreqs import FEATURES, TARGETS, check


@click.command()
@click.option(
    "--feature",
    "features",
    multiple=True,
    type=click.Choice(list(FEATURES)),
    help="Check only this feature (repeatable).",
)
@click.option(
    "--for",
    "target",
    type=click.Choice(list(TARGETS)),
    help="Check what a README command needs: demo or test (everything).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable findings.")
def doctor(features: tuple[str, ...], target: str | None, as_json: bool) -> None:
    """Probe every host tool and file edgevirt uses; exit 3 if a needed one is missing.

    Each probe exercises the tool (the cross compiler links against the arm64 libc, QEMU
    starts `virt` with `-nic none`), so a half-installed host is caught before a build.

    \b
    Examples:
      edgevirt doctor                    # everything, as a table
      edgevirt doctor --for demo         # just what `make demo` needs
      edgevirt doctor --feature servicevm --json
    """
    wanted = list(features) or list(TARGETS[target] if target else FEATURES)
    findings = check(wanted)
    missing = [f for f in findings if not f.ok]
    if as_json:
        click.echo(
            json.dumps(
                {
                    "ok": not missing,
                    "features": wanted,
                    "findings": [
                        {
                            "name": f.req.name,
                            "feature": f.req.feature,
                            "package": f.req.package,
                            "ok": f.ok,
                            "detail": f.detail,
                            "why": f.req.why,
                            "fix": f.req.fix,
                        }
                        for f in findings
                    ],
                    "install": sorted({f.req.package for f in missing if f.req.package}),
                },
                indent=2,
            )
        )
        sys.exit(EXIT_SETUP if missing else EXIT_OK)
    table = Table(title="edgevirt doctor", show_lines=False)
    for col in ("feature", "requirement", "", "package", "found / problem"):
        table.add_column(col, overflow="fold")
    last = ""
    for f in findings:
        feature = f.req.feature if f.req.feature != last else ""
        last = f.req.feature
        table.add_row(
            feature,
            escape(f.req.name),
            "[green]ok[/]" if f.ok else "[bold red]MISSING[/]",
            escape(f.req.package or "(host setting)"),
            escape(f.detail),
        )
    out.print(table)
    if missing:
        pkgs = sorted({f.req.package for f in missing if f.req.package})
        needs = sorted({f.req.feature for f in missing})
        err.print(f"[bold red]missing[/] for {', '.join(needs)}: {len(missing)} item(s)")
        if pkgs:
            err.print(f"[yellow]fix:[/] apt-get install {' '.join(pkgs)}  (or `make setup`)")
        for f in missing:
            if f.req.fix:
                err.print(f"[yellow]fix:[/] {escape(f.req.name)}: {escape(f.req.fix)}")
        sys.exit(EXIT_SETUP)
    err.print(f"[green]all {len(findings)} requirements present[/] ({', '.join(wanted)})")
