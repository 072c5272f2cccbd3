"""harness.run output folders: default names per settings, refusing to mix settings, and leaving nothing
behind on a user error. Entries without data are skipped before any model loads, so no test generates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.run import main

ENTRY = "mmlu:subject=anatomy"  # no --data-dir: planned, then skipped for its missing data


def _run(capsys, *args: str) -> tuple[int, str]:
    """(exit code, stderr) of harness.run in-process; a traceback would fail the test instead."""
    try:
        code = main(list(args))
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_default_folders_differ_by_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for n in ("3", "5", "3"):
        assert _run(capsys, "--run-entries", ENTRY, "--max-eval-instances", n) == (0, "")
    assert _run(capsys, "--run-entries", ENTRY, "--max-eval-instances", "3", "--num-train-trials", "2")[0] == 0
    assert _run(capsys, "--run-entries", ENTRY, "legalbench:subset=proa", "--max-eval-instances", "3")[0] == 0
    folders = sorted((tmp_path / "results" / "custom").iterdir())
    assert len(folders) == 4  # the repeated 3-instance run went back into its own folder
    settings = {(m["max_eval_instances"], m["num_train_trials"], len(m["run_entries"]))
                for m in map(_manifest, folders)}
    assert settings == {(3, None, 1), (5, None, 1), (3, 2, 1), (3, None, 2)}
    assert sum(f.name.startswith("smollm2-135m-none-n3-") for f in folders) == 3


def test_other_settings_in_an_output_folder_are_refused(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert _run(capsys, "--run-entries", ENTRY, "--max-eval-instances", "3", "--output", out)[0] == 0
    for extra in ([], ["--resume"]):
        code, err = _run(capsys, "--run-entries", ENTRY, "--max-eval-instances", "5", "--output", out, *extra)
        assert code == 1 and len(err.strip().splitlines()) == 1
        assert "max_eval_instances 3 -> 5" in err and "--overwrite" in err
    assert _manifest(tmp_path / "out")["max_eval_instances"] == 3  # untouched
    code, err = _run(capsys, "--run-entries", ENTRY, "--max-eval-instances", "3", "--compare-compression",
                     "--output", out)
    assert code == 1 and "another layout" in err and len(err.strip().splitlines()) == 1
    # the same settings go on (--resume skips finished runs); --overwrite replaces the folder
    assert _run(capsys, "--run-entries", ENTRY, "--max-eval-instances", "3", "--output", out, "--resume")[0] == 0
    (tmp_path / "out" / "stale.txt").write_text("")
    assert _run(capsys, "--run-entries", ENTRY, "--max-eval-instances", "5", "--output", out, "--overwrite")[0] == 0
    assert _manifest(tmp_path / "out")["max_eval_instances"] == 5 and not (tmp_path / "out" / "stale.txt").exists()


def test_unknown_model_leaves_no_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for output in ([], ["--output", str(tmp_path / "out")]):
        code, err = _run(capsys, "--suite", "smoke", "--model", "no-such-model", *output)
        assert code == 1 and len(err.strip().splitlines()) == 1 and "no-such-model" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("output", ["a-file", "a-file/below"])
def test_output_that_is_or_lies_below_a_file_is_one_line(tmp_path, capsys, output):
    (tmp_path / "a-file").write_text("mine")
    code, err = _run(capsys, "--run-entries", ENTRY, "--output", str(tmp_path / output))
    assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert (tmp_path / "a-file").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
