"""JUnit XML for CI: one ``<testsuite>`` per (suite, target), merged under ``<testsuites>``."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from edgevirt.suite.runner import SuiteResult


def _suite_element(r: SuiteResult) -> ET.Element:
    c = r.counts()
    el = ET.Element(
        "testsuite",
        name=f"{r.suite}@{r.target}" if r.target else r.suite,
        tests=str(len(r.steps)),
        failures=str(c["failed"]),
        errors=str(c["error"]),
        skipped=str(c["skipped"]),
        time=f"{r.seconds:.3f}",
    )
    for s in r.steps:
        tc = ET.SubElement(
            el,
            "testcase",
            classname=f"{r.suite}.{r.target or 'target'}",
            name=s.name,
            time=f"{s.seconds:.3f}",
        )
        if s.ok:
            pass
        elif s.outcome == "skipped":
            ET.SubElement(tc, "skipped", message=s.detail)
        else:
            tag = "error" if s.outcome == "error" else "failure"
            ET.SubElement(tc, tag, message=s.detail.splitlines()[0][:500] if s.detail else "")
            tc[-1].text = s.detail
        if s.output:
            ET.SubElement(tc, "system-out").text = s.output[-65536:]
    return el


def to_xml(results: list[SuiteResult]) -> bytes:
    root = ET.Element("testsuites")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for r in results:
        el = _suite_element(r)
        root.append(el)
        for k in totals:
            totals[k] += int(el.get(k, "0"))
    for k, v in totals.items():
        root.set(k, str(v))
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def write_junit(path: Path, results: list[SuiteResult]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(to_xml(results))
    return path
