"""The expect engine's bounded search window and memory (regression: a 4 MiB boot log was
rescanned whole on every read, 0.83 s of CPU, and kept in memory for the whole session).

These tests prove the bound structurally: the bytes handed to the regex engine and the
bytes kept in memory are counted, not timed (bench/console.py measures the time).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgevirt.console import expect as ex
from edgevirt.console.expect import Console
from edgevirt.console.fake import ScriptedPort

CHUNK = 4096


def boot_log(size: int) -> bytes:
    lines = []
    n, total = 0, 0
    while total < size:
        line = f"[{n / 1000:12.6f}] virtio_mmio a00{n % 32:02x}.virtio_mmio: probe {n}\r\n"
        lines.append(line)
        total += len(line)
        n += 1
    return "".join(lines).encode()[:size]


def chunks(data: bytes, size: int = CHUNK) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_console_buffer_4mib_log_search_window_is_bounded(tmp_path: Path) -> None:
    log = boot_log(4 << 20)
    port = ScriptedPort([*chunks(log), b"\r\nbuildroot login: "])
    con = Console(port, log_path=tmp_path / "console.log")  # type: ignore[arg-type]
    m = con.expect(rb"login: ", 30)
    assert m.end() == len(log) + len(b"\r\nbuildroot login: ")
    reads = port.reads
    assert reads > 1000
    # Each pass searched at most the new burst plus the window before it ...
    assert con.largest_search <= ex.SEARCH_WINDOW + CHUNK
    # ... so the whole wait handed the regex engine O(data + reads * window) bytes; a rescan
    # from the last match on every read (the defect) would have been ~reads * size / 2.
    assert con.searched_bytes <= len(log) + reads * (ex.SEARCH_WINDOW + CHUNK)
    quadratic = reads * len(log) // 2
    assert con.searched_bytes * 20 < quadratic, (con.searched_bytes, quadratic)
    # Memory: once consumed, only KEEP_BEHIND (+ one trim step) stays; the log has it all.
    con.expect(rb"", 1)  # the next expect trims what the last one consumed
    assert len(con._buf) <= ex.KEEP_BEHIND + ex._TRIM_STEP + CHUNK
    con.close()
    text = (tmp_path / "console.log").read_text()
    assert text.count("virtio_mmio: probe") == log.count(b"virtio_mmio: probe")


def test_console_match_straddling_reads_is_found_once(tmp_path: Path) -> None:
    # The marker is split over three bursts, after 1 MiB of noise.
    noise = boot_log(1 << 20)
    port = ScriptedPort([*chunks(noise), b"EVE", b"7 0", b"\r\nrest"])
    con = Console(port)  # type: ignore[arg-type]
    m = con.expect(rb"EVE7 (\d+)\r?\n", 10)
    assert (m.start(), m.group(1)) == (len(noise), b"0")
    # the leftmost match wins, as a full rescan would have found it
    port2 = ScriptedPort([b"x" * 100, b"ab1 ab", b"2 tail"])
    con2 = Console(port2)  # type: ignore[arg-type]
    assert con2.expect(re.compile(rb"ab\d"), 5).start() == 100


def test_console_offsets_survive_trimming_and_old_text_points_at_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ex, "KEEP_BEHIND", 1000)
    monkeypatch.setattr(ex, "_TRIM_STEP", 4096)
    data = b"".join(f"line {i}\n".encode() for i in range(5000))
    port = ScriptedPort([*chunks(data, 512), b"END\n"])
    con = Console(port, log_path=tmp_path / "c.log")  # type: ignore[arg-type]
    first = con.expect(rb"line 10\n", 5)
    start = first.end()
    m = con.expect(rb"END\n", 5)
    # a run()-style slice from an offset held across the wait is exact (nothing consumed)
    assert con.text(start, m.start()) == data[start:]
    con.expect(rb"", 1)
    for _ in range(3):
        port._chunks.append(b"more output\n" * 1000)
        con.expect(rb"more output\n", 5)
    con.drain(0.01, 0.5)
    assert con.base > 0
    old = con.text(0, 20)
    assert old.startswith(b"[... 20 bytes no longer in memory: see ") and b"c.log" in old
    assert con.search(re.compile(rb"line 0\n"), 0) is None  # gone from memory ...
    con.close()
    assert "line 0\n" in (tmp_path / "c.log").read_text()  # ... but not from the log


def test_console_flood_without_a_match_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ex, "MAX_BUFFER", 64 * 1024)
    monkeypatch.setattr(ex, "_TRIM_STEP", 8192)
    port = ScriptedPort(chunks(b"z" * (1 << 20)))
    con = Console(port)  # type: ignore[arg-type]
    with pytest.raises(ex.ConsoleTimeout):
        con.expect(rb"never", 0.5)
    assert len(con._buf) <= 64 * 1024 + 8192 + CHUNK
    assert con.pos == con.base > 0
