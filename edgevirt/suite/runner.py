"""Run a suite over a console; each step gives a verdict, a detail line and its output.

A failed check fails its step and the suite goes on. A broken target (console silent or
gone, a panic, QEMU dead) fails the step with the console's own words, and the remaining
steps are reported as not run: their results would mean nothing.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from edgevirt.console.expect import Console
from edgevirt.errors import ConfigError, EdgevirtError
from edgevirt.suite.model import Step, Suite

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    name: str
    kind: str
    ok: bool
    detail: str
    seconds: float = 0.0
    output: str = ""
    status: int | None = None
    #: "failed" (a check said no), "error" (the target broke), "skipped" (not run), or "".
    outcome: str = ""


@dataclass
class SuiteResult:
    suite: str
    target: str
    steps: list[StepResult] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.steps) and all(s.ok for s in self.steps)

    def counts(self) -> dict[str, int]:
        c = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
        for s in self.steps:
            c["passed" if s.ok else s.outcome or "failed"] += 1
        return c

    def to_json(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def _format(template: str, m: re.Match[str] | None) -> str:
    groups = m.groups() if m else ()
    named = m.groupdict() if m else {}
    try:
        return template.format(*groups, **named)
    except (IndexError, KeyError, ValueError):
        return template


def judge(step: Step, status: int, output: str, expand: Callable[[str], str]) -> tuple[bool, str]:
    """Apply a run step's checks; return (ok, detail)."""
    problems = []
    if step.status is not None and status != step.status:
        problems.append(f"exit status {status}, expected {step.status}")
    first: re.Match[str] | None = None
    for pat in step.match:
        m = re.search(expand(pat), output, re.M)
        if m is None:
            problems.append(f"output does not match {expand(pat)!r}")
        elif first is None:
            first = m
    for pat in step.no_match:
        m = re.search(expand(pat), output, re.M)
        if m is not None:
            problems.append(f"output matches {expand(pat)!r}: {m.group(0)[:200]!r}")
    if problems:
        tail = output.strip()[-300:]
        return False, "; ".join(problems) + (f"; output: {tail}" if tail else "")
    if step.detail:
        return True, _format(expand(step.detail), first)
    return True, f"exit {status}" + (f", matched {first.group(0)[:80]!r}" if first else "")


def run_suite(
    suite: Suite,
    console: Console,
    *,
    variables: dict[str, str] | None = None,
    reboot: Callable[[], Console] | None = None,
    abort: Callable[[], None] | None = None,
    target: str = "",
    on_step: Callable[[StepResult], None] | None = None,
) -> SuiteResult:
    variables = variables or {}
    result = SuiteResult(suite.name, target)
    t_suite = time.monotonic()

    def expand(text: str) -> str:
        return suite.expand(text, variables)

    broken: str | None = None
    for step in suite.steps:
        if broken is not None:
            sr = StepResult(step.name, step.kind, False, f"not run: {broken}", outcome="skipped")
            result.steps.append(sr)
            continue
        t0 = time.monotonic()
        try:
            if step.kind == "run":
                res = console.run(expand(step.text), step.timeout, abort)
                ok, detail = judge(step, res.status, res.output, expand)
                sr = StepResult(
                    step.name, "run", ok, detail, 0, res.output, res.status, "" if ok else "failed"
                )
            elif step.kind == "expect":
                m = console.expect(expand(step.text).encode(), step.timeout, abort)
                text = m.group(0).decode("utf-8", "replace")
                sr = StepResult(step.name, "expect", True, step.detail or f"saw {text[:80]!r}")
            elif step.kind == "send":
                console.send(expand(step.text))
                sr = StepResult(step.name, "send", True, f"sent {len(step.text)} characters")
            else:
                if reboot is None:
                    raise ConfigError(
                        f"{suite.path}: step {step.name!r}: this target cannot reboot"
                    )
                console = reboot()
                sr = StepResult(step.name, "reboot", True, "power-cycled back to the shell")
        except ConfigError:
            raise
        except EdgevirtError as e:
            broken = f"step {step.name!r} broke the target"
            sr = StepResult(step.name, step.kind, False, str(e), outcome="error")
            result.error = str(e)
        sr.seconds = time.monotonic() - t0
        result.steps.append(sr)
        log.info("step %s: %s", step.name, "ok" if sr.ok else sr.detail)
        if on_step:
            on_step(sr)
    result.seconds = time.monotonic() - t_suite
    return result
