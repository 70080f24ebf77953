"""atheris target: the files a user hands edgevirt: board profiles (TOML), system specs
(TOML) and test suites (YAML).

Structure-aware: the input picks one of the shipped files (every board in ``boards/``, every
spec in ``devicetree/specs/``, the shipped suites) and mutates its text line by line: a
value replaced by another TOML/YAML token (numbers, sizes, strings, tables, arrays, deep
nesting), a line dropped or duplicated, bytes inserted (non-UTF-8 included). Runs
``load_board``, ``load_spec`` and ``parse_suite`` on the result. Invariants: fuzz/guard.py
(only ``EdgevirtError``, in practice ``ConfigError`` naming the file and key).

    PYTHONPATH=. .venv/bin/python fuzz/fuzz_config.py fuzz/corpus/config -max_len=1024
"""

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guard import Guard  # noqa: E402

with atheris.instrument_imports(include=["edgevirt"]):
    from edgevirt.board import load_board
    from edgevirt.spec import load_spec
    from edgevirt.suite.model import parse_suite

ROOT = Path(__file__).resolve().parent.parent
BOARDS = sorted((ROOT / "boards").glob("*.toml"))
SPECS = sorted((ROOT / "devicetree/specs").glob("*.toml"))
SUITES = sorted((ROOT / "edgevirt/suites").glob("*.yaml"))
FILES = [(p, p.read_bytes()) for p in BOARDS + SPECS + SUITES]
TOKENS = [b"0", b"-1", b"0x10000000", b'"64M"', b'"1T"', b'"-5K"', b"1e999", b"true", b"[]",
          b"{}", b'"x"', b"[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]", b'"\\u0000"',
          b"18446744073709551616", b"nan", b"inf", b"- a", b"&a [*a]", b"!!python/object:os.system",
          b"{a: [1, {b: 2}]}", b"0o777", b"'(unclosed'", b"null", b"~", b"2026-12-07"]  # fmt: skip
guard = Guard()


def mutate(text: bytes, fdp: atheris.FuzzedDataProvider) -> bytes:
    lines = text.split(b"\n")
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        i = fdp.ConsumeIntInRange(0, len(lines) - 1)
        op = fdp.ConsumeIntInRange(0, 4)
        line = lines[i]
        if op == 0 and (b"=" in line or b":" in line):
            sep = b"=" if b"=" in line else b":"
            key = line.split(sep, 1)[0]
            lines[i] = key + sep + b" " + fdp.PickValueInList(TOKENS)
        elif op == 1:
            del lines[i]
            if not lines:
                lines = [b""]
        elif op == 2:
            lines.insert(i, line)
        elif op == 3:
            pos = fdp.ConsumeIntInRange(0, len(line))
            lines[i] = line[:pos] + fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 6)) + line[pos:]
        else:
            lines[i] = fdp.PickValueInList(TOKENS)
    return b"\n".join(lines)


def check(out: Path, path: Path, blob: bytes) -> None:
    target = out / path.name
    target.write_bytes(blob)
    if path in BOARDS:
        load_board(str(target))
    elif path in SPECS:
        load_spec(target)
    else:
        parse_suite(blob.decode("utf-8", "surrogateescape"), target)


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    path, text = FILES[fdp.ConsumeIntInRange(0, len(FILES) - 1)]
    blob = mutate(text, fdp)
    guard.run(lambda out: check(out, path, blob))


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
