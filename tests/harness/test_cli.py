"""Every harness command line parses with engine.flags.ArgumentParser: defaults in --help, usage errors in
one line with exit code 2 (harness.regress documents 2 for every usage error)."""

from __future__ import annotations

import argparse

import pytest

from engine.flags import ArgumentParser
from harness import regress, run, sweep
from harness.report import reference_check, runs

CLIS = {"harness.run": run.main, "harness.sweep": sweep.main, "harness.regress": regress.main,
        "harness.report": runs.main, "harness.report.reference_check": reference_check.main}


@pytest.fixture
def parsers(monkeypatch) -> list[ArgumentParser]:
    """The shared parsers a command builds (a plain argparse parser is not recorded)."""
    seen: list[ArgumentParser] = []
    parse = ArgumentParser.parse_args

    def spy(self, *args, **kwargs):
        seen.append(self)
        return parse(self, *args, **kwargs)

    monkeypatch.setattr(ArgumentParser, "parse_args", spy)
    return seen


@pytest.mark.parametrize("name", CLIS)
def test_help_shows_every_default(name, parsers, capsys):
    with pytest.raises(SystemExit) as exit_:
        CLIS[name](["--help"])
    assert exit_.value.code == 0
    [parser] = parsers
    text = " ".join(capsys.readouterr().out.split())  # undo the help's line wrapping
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            assert action.help, f"{action.option_strings[0]} has a default but no help"
            assert f"(default: {action.default})" in text, action.option_strings[0]


@pytest.mark.parametrize("name", CLIS)
def test_usage_errors_are_one_line_and_exit_2(name, parsers, capsys):
    with pytest.raises(SystemExit) as exit_:
        CLIS[name](["--no-such-flag"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(parsers) == 1
    assert len(err.strip().splitlines()) == 1 and ": error: " in err and err.strip().endswith("see --help")
