"""harness.regress on lm-eval --log_samples folders: the same paired tests and exit codes as on HELM outputs.

The folders are written here in lm-eval 0.4.13's layout (results_<time>.json beside samples_<task>_<time>.jsonl);
the real ones from SmolLM2-135M are in harness.bench_lm_eval's output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from harness import regress

STAMP = "2026-11-30T10-00-00.000000"
N = 40


def write_output(folder: Path, model_args: dict, answers: list[int], gsm_right: list[bool]) -> Path:
    """An lm-eval output with an MMLU-like task (correct answer 0) and a GSM8K-like task with two filters."""
    run = folder / "model"
    run.mkdir(parents=True)
    configs = {"mc": {"metric_list": [{"metric": "acc"}], "output_type": "multiple_choice"},
               "gen": {"metric_list": [{"metric": "exact_match"}], "output_type": "generate_until"}}
    (run / f"results_{STAMP}.json").write_text(json.dumps(
        {"configs": configs, "config": {"model": "flexhelm", "model_args": model_args}}))
    mc = [{"doc_id": i, "filter": "none", "acc": float(a == 0),
           "filtered_resps": [[str(-1.0 - (k != a)), "False"] for k in range(4)]} for i, a in enumerate(answers)]
    gen = [{"doc_id": i, "filter": f, "exact_match": float(ok if f == "strict-match" else True),
            "filtered_resps": [str(18 if ok else i)]} for i, ok in enumerate(gsm_right)
           for f in ("strict-match", "flexible-extract")]
    for task, rows in (("mc", mc), ("gen", gen)):
        (run / f"samples_{task}_{STAMP}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture
def outputs(tmp_path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    answers = rng.integers(0, 4, N).tolist()
    right = (rng.random(N) < 0.4).tolist()
    four = list(answers)
    for i in range(0, N, 8):  # 4-bit: a few answers change, accuracy holds
        four[i] = (four[i] + 1) % 4
    two = [(a + 1 + int(rng.integers(0, 3))) % 4 if a == 0 else 1 + (a % 3) for a in answers]  # all change
    return {"none": write_output(tmp_path / "none", {"pretrained": "m"}, answers, right),
            "w4": write_output(tmp_path / "w4", {"pretrained": "m", "compress": "both"}, four, right),
            "w2": write_output(tmp_path / "w2", {"pretrained": "m", "compress": "weight", "comp_bits": 2}, two,
                               [False] * N)}


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        regress.main(argv)
    return info.value.code


def test_four_bit_passes(outputs, capsys):
    assert _exit_code(["--baseline", str(outputs["none"]), "--candidate", str(outputs["w4"])]) == 0
    out = capsys.readouterr().out
    assert "flexhelm-none->flexhelm-w4c4" in out and "PASS: 0 of 2" in out


def test_planted_two_bit_fails(outputs, capsys):
    table = regress.regress(outputs["w2"], outputs["none"], regress.DEFAULT_MAX_DROP, regress.DEFAULT_MAX_CHANGED,
                            0.05).set_index("entry")
    assert table.loc["mc", "changed"] == 1.0 and table.loc["mc", "verdict"].startswith("FAIL")
    assert table.loc["mc", "checks"] == "accuracy+changed" and table.loc["gen", "checks"] == "accuracy"
    assert table.loc["gen", "n"] == N  # judged on its first filter only
    assert table.loc["gen", "verdict"] == "FAIL accuracy"
    assert _exit_code(["--baseline", str(outputs["none"]), "--candidate", str(outputs["w2"])]) == 1
    assert "REGRESSION: 2 of 2" in capsys.readouterr().out


def test_missing_samples_is_a_usage_error(outputs):
    next((outputs["w4"] / "model").glob("samples_mc_*")).unlink()
    assert _exit_code(["--baseline", str(outputs["none"]), "--candidate", str(outputs["w4"])]) == 2
