"""What every command module shares: consoles, exit codes, error rendering, progress,
the options several commands take alike."""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgevirt.errors import ConfigError, EdgevirtError, SetupError
from edgevirt.report import Reporter

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SETUP, EXIT_CONFIG = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130

out = Console()
err = Console(stderr=True)


def fail(e: EdgevirtError) -> NoReturn:
    # Messages quote TOML keys like [qemu] or [[device]]: never let rich read them as markup.
    err.print(f"[bold red]error:[/] {escape(str(e))}")
    if e.hint:
        err.print(f"[yellow]hint:[/] {escape(e.hint)}")
    code = (
        EXIT_SETUP
        if isinstance(e, SetupError)
        else EXIT_CONFIG
        if isinstance(e, ConfigError)
        else EXIT_FAILED
    )
    sys.exit(code)


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """SIGTERM (a CI job cancelled, `timeout`) unwinds like Ctrl-C: everything is stopped."""
    signal.signal(signal.SIGTERM, _sigterm)


@contextlib.contextmanager
def interruptible(stopped: str | None = None) -> Iterator[None]:
    """The body of a command that drives a target: Ctrl-C (or SIGTERM, see
    :func:`stop_on_sigterm`) exits 130, saying ``stopped`` (what was powered off or
    released on the way out) if given; an EdgevirtError exits through :func:`fail`."""
    try:
        yield
    except KeyboardInterrupt:
        if stopped is not None:
            err.print(f"[bold red]interrupted:[/] {stopped}")
        sys.exit(EXIT_INTERRUPTED)
    except EdgevirtError as e:
        fail(e)


def out_dir_option(help: str) -> Callable[[Any], Any]:
    """``-o/--out DIR`` (required; the ``out_dir`` parameter): where a command writes."""
    return click.option(
        "-o",
        "--out",
        "out_dir",
        type=click.Path(file_okay=False, path_type=Path),
        required=True,
        help=help,
    )


def field_table(title: str, rows: Iterable[tuple[str, str]]) -> Table:
    """A header-less two-column table: one (field, value) per row."""
    t = Table(title=title, show_header=False)
    t.add_column("field")
    t.add_column("value")
    for field, value in rows:
        t.add_row(field, value)
    return t


class RichReporter(Reporter):
    """Renders `up` progress: one line per step, a bar for long builds."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._line_phase = ""
        self._line_tenth = -1
        self._line_start = 0.0

    def step(self, text: str) -> None:
        self._close_bar()
        if not self.quiet:
            err.print(f"[cyan]▶[/] {text}")

    def progress(self, phase: str, done: int, total: int) -> None:
        if self.quiet:
            return
        if not err.is_terminal:
            self._progress_line(phase, done, total)
            return
        if self._progress is None:
            self._progress = Progress(
                TextColumn("  {task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
                console=err,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(phase, total=total)
        assert self._task is not None
        self._progress.update(self._task, description=phase, completed=done, total=total)

    def _progress_line(self, phase: str, done: int, total: int) -> None:
        """A CI log gets a line per 10 % instead of a bar it cannot redraw."""
        tenth = 10 * done // total if total > 0 else 10
        if phase == self._line_phase and tenth <= self._line_tenth:
            return
        if phase != self._line_phase:
            self._line_phase, self._line_start = phase, time.monotonic()
        self._line_tenth = tenth
        elapsed = time.monotonic() - self._line_start
        err.print(f"  {phase}: {10 * tenth}% ({done}/{total}) {elapsed:.0f}s", highlight=False)

    def _close_bar(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
