"""YAML suites: parsing and validation, the runner against a real shell, JUnit output."""

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from edgevirt.console.expect import Console
from edgevirt.console.fake import PtyShellPort
from edgevirt.errors import ConfigError
from edgevirt.suite.junit import to_xml
from edgevirt.suite.model import load_suite, parse_suite, shipped_suites
from edgevirt.suite.runner import run_suite


def suite(text: str):
    return parse_suite(text, Path("s.yaml"))


@pytest.fixture
def con(tmp_path):
    c = Console(PtyShellPort(), log_path=tmp_path / "console.log", name="fake")
    c.expect(rb"fake# ", 5)
    yield c
    c.close()


def test_shipped_smoke_suite_has_ups_check_names():
    s = load_suite("smoke")
    names = [st.name for st in s.steps]
    assert names == ["virtio features", "restricted DMA pool", "blk write/read-back", "hwrng"]
    assert {"smoke", "boot"} <= set(shipped_suites())


@pytest.mark.parametrize(
    "text, message",
    [
        ("steps: []", "non-empty list"),
        ("steps: [{name: a}]", "exactly one of run, expect, send, reboot"),
        ("steps: [{run: x, expect: y}]", "exactly one of"),
        ("steps: [{run: x, bogus: 1}]", "unknown key(s) bogus"),
        ("steps: [{run: x, match: '('}]", "invalid regex"),
        ("steps: [{run: x, timeout: 0}]", "timeout: expected seconds > 0"),
        ("steps: [{expect: x, status: 1}]", "only apply to run steps"),
        ("steps: [{name: a, run: x}, {name: a, run: y}]", "duplicate step name(s) a"),
        ("steps: [{reboot: 1}]", "reboot: expected true"),
        ("name: [", "not valid YAML"),
    ],
)
def test_invalid_suites_are_refused_with_the_reason(text, message):
    with pytest.raises(ConfigError) as ei:
        suite(text)
    assert message in str(ei.value) and "s.yaml" in str(ei.value)


def test_unknown_suite_name_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="shipped suites: boot, carveout, smoke"):
        load_suite("nope")


def test_vars_expand_known_names_and_leave_shell_variables():
    s = suite("vars: {who: world}\nsteps: [{run: 'echo ${who} $HOME ${x:-y} ${other}'}]")
    assert s.expand(s.steps[0].text, {}) == "echo world $HOME ${x:-y} ${other}"
    assert s.expand("${who}", {"who": "target"}) == "target"


def test_runner_checks_status_match_and_no_match(con):
    s = suite(
        """
vars: {word: hello}
steps:
  - {name: greet, run: 'echo ${word} there', match: '^(\\w+) there$', detail: 'said {0}'}
  - {name: wrong status, run: 'sh -c "exit 2"'}
  - {name: expected status, run: 'sh -c "exit 2"', status: 2}
  - {name: forbidden text, run: 'echo WARNING: bad', no_match: 'WARNING'}
  - {name: missing text, run: 'echo abc', match: 'xyz'}
  - {name: send and expect, send: "echo sent-marker\\n"}
  - {name: seen, expect: 'sent-marker', timeout: 5}
"""
    )
    r = run_suite(s, con)
    got = {st.name: (st.ok, st.detail) for st in r.steps}
    assert got["greet"] == (True, "said hello")
    assert got["wrong status"][0] is False and "exit status 2, expected 0" in got["wrong status"][1]
    assert got["expected status"][0] is True
    assert not got["forbidden text"][0] and "matches 'WARNING'" in got["forbidden text"][1]
    assert not got["missing text"][0] and "does not match 'xyz'" in got["missing text"][1]
    assert got["send and expect"][0] and got["seen"][0]
    assert not r.ok and r.error is None
    assert r.counts() == {"passed": 4, "failed": 3, "error": 0, "skipped": 0}


def test_broken_target_fails_the_step_and_skips_the_rest(con):
    s = suite("steps: [{name: silent, expect: never, timeout: 0.5}, {name: after, run: 'true'}]")
    con.sendline("echo last-words")
    r = run_suite(s, con)
    assert [st.outcome for st in r.steps] == ["error", "skipped"]
    assert "did not appear within" in r.steps[0].detail and "last-words" in r.steps[0].detail
    assert "not run" in r.steps[1].detail and r.error


def test_disconnect_mid_command_is_an_error_with_the_log_kept(con, tmp_path):
    s = suite("steps: [{name: long, run: 'sleep 5', timeout: 10}, {name: next, run: 'true'}]")
    import threading

    threading.Timer(0.5, con.port.kill).start()
    r = run_suite(s, con)
    assert r.steps[0].outcome == "error" and "disconnected" in r.steps[0].detail
    assert r.steps[1].outcome == "skipped"
    assert "run #1: sleep 5" in (tmp_path / "console.log").read_text()


def test_reboot_step_without_a_power_driver_is_a_config_error(con):
    with pytest.raises(ConfigError, match="cannot reboot"):
        run_suite(suite("steps: [{reboot: true}]"), con)


def test_junit_xml_counts_and_cases(con):
    s = suite(
        "name: demo\nsteps: [{name: ok, run: 'true'}, {name: bad, run: 'false'},"
        " {name: gone, expect: never, timeout: 0.3}, {name: later, run: 'true'}]"
    )
    r = run_suite(s, con, target="t1")
    root = ET.fromstring(to_xml([r, r]))
    assert root.tag == "testsuites" and root.get("tests") == "8"
    assert (root.get("failures"), root.get("errors"), root.get("skipped")) == ("2", "2", "2")
    ts = root.find("testsuite")
    assert ts is not None and ts.get("name") == "demo@t1"
    cases = {tc.get("name"): tc for tc in ts.findall("testcase")}
    assert cases["ok"].find("failure") is None
    assert cases["bad"].find("failure") is not None
    assert cases["gone"].find("error") is not None
    assert cases["later"].find("skipped") is not None
