"""The docs and the code agree: every flag the README and docs/ name exists (on the command an
example runs, or on some command; other tools' flags are listed here with whose they are), and
every exit status docs/errors.md lists is the one the command line gives for that outcome."""

import re
from types import SimpleNamespace

import pytest

from commands import api
from commands.cli import main
from safeexport.errors import ConfigError
from tests.conftest import REPO, cli

# flags the docs name that belong to other programs
OTHERS = {"--full": "pytest (tests/conftest.py)", "--dist": "pytest-xdist", "--head": "ray start",
          "--address": "ray start", "--cpu": "a phone's performance daemon",
          "--variant": "debootstrap", "--graph": "benchmark_model",
          "--input": "benchmark_model", "--num": "benchmark_model",
          "--output": "benchmark_model", "--ratio": "benchmarks/bench_compress.py",
          "--set": "benchmarks/bench_compress.py", "--spincount": "bench_contention.py",
          "--methods": "benchmarks/bench_executors.py", "--cpus": "bench_executors.py"}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
EXAMPLE = re.compile(r"safeexport (compress|run|export|evaluate|study|report)\b(.*)")


def _docs():
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def _flags(command) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}


def test_every_flag_the_docs_name_exists():
    every = set().union(*(_flags(c) for c in main.commands.values()), _flags(main),
                        {"--version"})
    wrong = []
    for doc in _docs():
        text = doc.read_text().replace("\\\n", " ")  # a command continued on the next line
        for line in text.splitlines():
            for m in EXAMPLE.finditer(line):  # an example: its flags are its command's
                own = _flags(main.commands[m.group(1)])
                rest = m.group(2).split("`")[0]  # up to the end of an inline example
                wrong += [f"{doc.name}: safeexport {m.group(1)} {f}"
                          for f in FLAG.findall(rest) if f not in own and f not in OTHERS]
            wrong += [f"{doc.name}: {f}" for f in FLAG.findall(line)
                      if f not in every and f not in OTHERS]
    assert not wrong, wrong


def _statuses() -> set[int]:
    text = (REPO / "docs" / "errors.md").read_text()
    table = text[text.index("## Exit statuses"):]
    return {int(s) for s in re.findall(r"^\| (\d+) \|", table, re.M)}


def test_every_exit_status_the_docs_list_is_the_one_given(monkeypatch, tmp_path):
    """Each outcome of docs/errors.md's table through the command line (the verdicts
    themselves are tested on real files in test_evaluate.py; here the mapping to statuses)."""
    given = {}

    def evaluate_gives(outcome):
        def fake(*files, **kw):
            if outcome == "interrupted":
                raise KeyboardInterrupt
            if outcome == "error":
                raise ConfigError("refused")
            report = {"outcome": outcome}
            return SimpleNamespace(outcome=outcome, passed=outcome == "PASS", report=report)
        monkeypatch.setattr(api, "evaluate", fake)
        monkeypatch.setattr("commands.cli.printers.evaluation", lambda *a: None)
        return cli("evaluate", tmp_path / "m.onnx").returncode

    for outcome in ("PASS", "FAIL", "INCONCLUSIVE", "error", "interrupted"):
        given[outcome] = evaluate_gives(outcome)
    assert given == {"PASS": 0, "FAIL": 1, "INCONCLUSIVE": 3, "error": 2, "interrupted": 130}
    assert set(given.values()) == _statuses()


@pytest.mark.parametrize("flag", sorted(OTHERS))
def test_other_programs_flags_are_not_ours(flag):
    """A flag listed as another program's that a command gains must be checked as ours."""
    assert all(flag not in _flags(c) for c in main.commands.values())
