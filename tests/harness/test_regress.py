"""harness.regress: its paired tests, and its exit codes on real and planted-broken HELM outputs."""

from __future__ import annotations

import json
import shutil
from math import comb
from pathlib import Path

import numpy as np
import pytest

from harness import regress
from harness.report.runs import load_report

REFERENCE = Path(__file__).resolve().parents[2] / "results" / "reference" / "smoke"


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        regress.main(argv)
    return info.value.code


def test_mcnemar_exact_counts_only_discordant_pairs():
    # 8 instances right before and wrong after, 1 the other way, 5 right in both
    base = np.array([1] * 8 + [0] + [1] * 5, dtype=float)
    cand = np.array([0] * 8 + [1] + [1] * 5, dtype=float)
    assert regress.drop_p_value(base, cand) == pytest.approx((comb(9, 8) + comb(9, 9)) / 2**9)
    assert regress.drop_p_value(cand, base) == pytest.approx(1 - comb(9, 9) / 2**9)  # P(X >= 1), X ~ B(9, 1/2)
    assert regress.drop_p_value(base, base) == 1.0


def test_paired_bootstrap_for_graded_metrics():
    base = np.random.default_rng(1).uniform(0.2, 0.8, size=200)
    assert regress.drop_p_value(base, base - 0.05) < 0.001
    assert regress.drop_p_value(base, base + 0.05) == 1.0


def test_changed_fraction_test_is_one_sided_binomial():
    assert regress.changed_p_value(5, 5, 0.3) == pytest.approx(0.3**5)
    assert regress.changed_p_value(0, 5, 0.3) == 1.0


@pytest.fixture
def baseline(tmp_path) -> Path:
    """The reference's uncompressed variant: a plain harness output."""
    return Path(shutil.copytree(REFERENCE / "none", tmp_path / "baseline"))


def _plant_broken_quantizer(output: Path) -> None:
    """Every prediction changes to garbage and scores 0, as 2-bit weights do to a small model."""
    for run in (output / "runs").glob("*/*"):
        state = json.loads((run / "scenario_state.json").read_text())
        for request_state in state["request_states"]:
            for completion in request_state["result"]["completions"]:
                completion["text"] = " permission"
        (run / "scenario_state.json").write_text(json.dumps(state))
        per_instance = json.loads((run / "per_instance_stats.json").read_text())
        for record in per_instance:
            for stat in record["stats"]:
                if stat["name"]["name"] in ("exact_match", "quasi_exact_match", "final_number_exact_match"):
                    stat.update(sum=0, mean=0.0, sum_squared=0, min=0, max=0)
        (run / "per_instance_stats.json").write_text(json.dumps(per_instance))


def test_identical_outputs_pass(baseline, tmp_path, capsys):
    candidate = shutil.copytree(baseline, tmp_path / "candidate")
    assert _exit_code(["--baseline", str(baseline), "--candidate", str(candidate)]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" not in out


def test_planted_broken_quantizer_fails(baseline, tmp_path, capsys):
    """On the smoke baseline's few instances only a strict --max-changed is decisive; the defaults need ~20+."""
    candidate = shutil.copytree(baseline, tmp_path / "candidate")
    _plant_broken_quantizer(candidate)
    max_changed = 0.3
    table = regress.regress(candidate, baseline, regress.DEFAULT_MAX_DROP, max_changed, 0.05)
    assert (table["changed"] == 1.0).all()
    # multiple-choice entries are gated on changed predictions; with n changed of n the binomial
    # p-value is max_changed**n, decisive once that is below alpha
    decisive = (table["checks"] == "accuracy+changed") & (max_changed ** table["n"] < 0.05)
    assert decisive.any()
    assert table.loc[decisive, "verdict"].str.startswith("FAIL").all()
    free_form = table[table["checks"] == "accuracy"]  # their text may change: only accuracy decides
    accuracy_fires = (free_form["p_drop"] < 0.05) & (free_form["drop_pts"] > regress.DEFAULT_MAX_DROP)
    assert ((free_form["verdict"] == "ok") == ~accuracy_fires).all()
    argv = ["--baseline", str(baseline), "--candidate", str(candidate), "--max-changed", str(max_changed)]
    assert _exit_code(argv) == 1
    assert "REGRESSION" in capsys.readouterr().out


def test_compare_compression_output_is_checked_on_its_own():
    """With only --candidate, the compressed variant is compared against the uncompressed one."""
    table = regress.regress(REFERENCE, None, regress.DEFAULT_MAX_DROP, regress.DEFAULT_MAX_CHANGED, 0.05)
    rep = load_report(REFERENCE)
    compressed = sorted(set(rep["compression"]) - {"none"})
    assert sorted(table["variants"].unique()) == [f"none->{c}" for c in compressed]
    assert len(table) == len(rep[rep["compression"] != "none"])


@pytest.mark.parametrize("argv", [
    ["--candidate", "{tmp}/missing"],
    ["--candidate", "{tmp}"],  # a folder without HELM runs
    ["--candidate", "{reference}/none"],  # one variant and no --baseline: nothing to compare
    ["--baseline", "{reference}/none"],  # --candidate is required
    ["--candidate", "{reference}", "--alpha", "2"],
])
def test_usage_errors_exit_2(argv, tmp_path):
    argv = [a.format(tmp=tmp_path, reference=REFERENCE) for a in argv]
    assert _exit_code(argv) == 2


def test_accuracy_drop_alone_fails_a_run(baseline, tmp_path, capsys):
    """Every MMLU test instance loses its exact_match while every prediction stays the same (0% changed):
    only the accuracy rule can fail it. MMLU's 3 test instances give McNemar p = 0.5**3, so alpha is 0.2."""
    candidate = shutil.copytree(baseline, tmp_path / "candidate")
    [mmlu] = (candidate / "runs").glob("*/mmlu:*")
    per_instance = json.loads((mmlu / "per_instance_stats.json").read_text())
    for record in per_instance:
        for stat in record["stats"]:
            if stat["name"] == {"name": "exact_match", "split": "test"}:
                stat.update(sum=0, mean=0.0, sum_squared=0, min=0, max=0)
    (mmlu / "per_instance_stats.json").write_text(json.dumps(per_instance))
    table = regress.regress(candidate, baseline, regress.DEFAULT_MAX_DROP, regress.DEFAULT_MAX_CHANGED, 0.2)
    row = table.set_index("entry").loc[next(e for e in table["entry"] if e.startswith("mmlu"))]
    assert row["checks"] == "accuracy+changed" and row["changed"] == 0.0  # the changed rule has nothing to see
    assert row["drop_pts"] == pytest.approx(100.0) and row["p_drop"] == pytest.approx(0.5 ** 3)
    assert row["verdict"] == "FAIL accuracy"
    assert (table.loc[~table["entry"].str.startswith("mmlu"), "verdict"] == "ok").all()
    assert _exit_code(["--baseline", str(baseline), "--candidate", str(candidate), "--alpha", "0.2"]) == 1
    assert "REGRESSION: 1 of 3" in capsys.readouterr().out
