"""harness.report: every report value is checked against the HELM and engine files it comes from.

The input is a real harness output committed under results/reference/smoke (the smoke suite on
SmolLM2-135M, uncompressed and compressed, in the --compare-compression layout).
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pandas as pd
import pytest

from engine.errors import UserError
from harness.report import runs as report

REFERENCE = Path(__file__).resolve().parents[2] / "results" / "reference" / "smoke"
# HELM's headline metric for each smoke scenario (its schemas' environment.main_name)
MAIN_METRIC = {"mmlu": "exact_match", "gsm": "final_number_exact_match", "synthetic_reasoning": "quasi_exact_match"}
TIERS = ("gpu", "cpu", "disk")


def _json(path: Path):
    return json.loads(path.read_text())


@pytest.fixture
def output(tmp_path) -> Path:
    """A writable copy of the reference output, without the files the report writes."""
    dst = tmp_path / "smoke"
    shutil.copytree(REFERENCE, dst, ignore=shutil.ignore_patterns("report.*", "compression.csv", "*.png"))
    return dst


def _test_values(run: Path, metric: str) -> dict[str, float]:
    """Per-instance values of a metric on the test split, read straight from per_instance_stats.json."""
    return {r["instance_id"]: s["mean"] for r in _json(run / "per_instance_stats.json") for s in r["stats"]
            if s["name"] == {"name": metric, "split": "test"}}


def _completions(run: Path) -> dict[str, str]:
    return {s["instance"]["id"]: s["result"]["completions"][0]["text"].strip()
            for s in _json(run / "scenario_state.json")["request_states"]}


def test_rows_match_the_helm_and_engine_files(output):
    rep = report.load_report(output)
    variants = sorted(p.name for p in output.iterdir() if (p / "runs").is_dir())
    runs = {v: sorted(p.parent.name for p in (output / v / "runs").glob("*/*/run_spec.json")) for v in variants}
    assert sorted(rep["variant"].unique()) == variants
    assert sorted(rep["run"]) == sorted(r for v in variants for r in runs[v])
    for row in rep.itertuples():
        run = output / row.path
        manifest = _json(output / row.variant / "manifest.json")
        stats, engine = _json(run / "stats.json"), _json(run / "engine_stats.json")
        assert row.run == _json(run / "run_spec.json")["name"]
        assert (row.model, row.compression) == (manifest["model"], manifest["compression"])
        assert row.compression == row.variant  # the layout names variants by compression label
        assert (row.metric, row.split) == (MAIN_METRIC[row.scenario], "test")
        [aggregate] = [s for s in stats if s["name"] == {"name": row.metric, "split": "test"}]
        values = list(_test_values(run, row.metric).values())
        assert row.eval_instances == len(values) > 0
        [counted] = [s for s in stats if s["name"] == {"name": "num_instances", "split": "test"}]
        assert row.eval_instances == counted["mean"]  # HELM's own count for the headline metric's split
        assert row.value == aggregate["mean"] == pytest.approx(statistics.mean(values))
        if len(values) > 1:
            assert row.stderr == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)))
        for key in ("prefill_s", "decode_s", "generated_tokens", "prompt_tokens", "padded_prompt_tokens"):
            assert getattr(row, key) == engine[key], key
        seconds = engine["prefill_s"] + engine["decode_s"]
        assert row.tokens_per_s == pytest.approx(engine["generated_tokens"] / seconds)
        assert row.tokens_per_s == pytest.approx(engine["generated_tokens_per_s"])
        assert row.prompt_tokens_per_s == pytest.approx(engine["prompt_tokens"] / engine["prefill_s"])
        assert row.padding_efficiency == pytest.approx(engine["padding_efficiency"])
        assert row.effective_batch == engine["mean_batch_size"]
        for tier in TIERS:
            assert getattr(row, f"peak_{tier}_bytes") == engine["peak_bytes"][tier]
            assert getattr(row, f"read_{tier}_bytes") == engine["bytes_read"][tier]


def test_written_report_and_compression_table(output):
    rep = report.write_report(output)
    pd.testing.assert_frame_equal(pd.read_csv(output / "report.csv"), rep, check_dtype=False)
    md = (output / "report.md").read_text()
    assert all(f"| {row.entry} | {row.model} | {row.compression} |" in md for row in rep.itertuples())

    comp = pd.read_csv(output / "compression.csv")
    compressed = rep[rep["compression"] != "none"]
    assert len(comp) == len(compressed) > 0
    for row in comp.itertuples():
        base = rep[(rep["compression"] == "none") & (rep["entry"] == row.entry)].iloc[0]
        cand = compressed[(compressed["compression"] == row.compression) & (compressed["entry"] == row.entry)].iloc[0]
        assert row.metric_delta == pytest.approx(cand["value"] - base["value"])
        base_run, cand_run = output / base["path"], output / cand["path"]
        ids = set(_test_values(base_run, row.metric)) & set(_test_values(cand_run, row.metric))
        before, after = _completions(base_run), _completions(cand_run)
        assert row.paired_instances == len(ids)
        assert row.changed_prediction_rate == pytest.approx(sum(before[i] != after[i] for i in ids) / len(ids))
        eb, ec = _json(base_run / "engine_stats.json"), _json(cand_run / "engine_stats.json")
        assert row.throughput_ratio == pytest.approx(ec["generated_tokens_per_s"] / eb["generated_tokens_per_s"])
        assert row.memory_ratio == pytest.approx(sum(ec["peak_bytes"].values()) / sum(eb["peak_bytes"].values()))
    for png in ("throughput.png", "accuracy_compression.png"):
        data = (output / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png


def test_single_output_folder_is_one_variant(output):
    """A plain harness output (runs/ at the top) reads as variant '.' with its manifest's compression."""
    rep = report.load_report(output / "none")
    assert set(rep["variant"]) == {"."} and set(rep["compression"]) == {"none"}


@pytest.mark.parametrize("make", [lambda p: p / "missing", lambda p: p])
def test_usage_errors_name_the_problem(tmp_path, make, capsys):
    with pytest.raises(UserError, match="does not exist|no HELM runs"):
        report.load_report(make(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(make(tmp_path))])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.startswith("error: ")


def _plain_output_with_stock_run(tmp_path: Path) -> Path:
    """The reference's uncompressed output, plus a stock `helm-run -o OUT --suite stock` run of MMLU beside
    it (HELM's files only: stock helm-run with our client writes no engine_stats.json)."""
    out = Path(shutil.copytree(REFERENCE / "none", tmp_path / "out"))
    [mmlu] = (out / "runs" / "smoke").glob("mmlu:*")
    shutil.copytree(mmlu, out / "runs" / "stock" / mmlu.name, ignore=shutil.ignore_patterns("engine_stats.json"))
    return out


def test_stock_helm_runs_are_labelled_and_never_paired(tmp_path):
    out = _plain_output_with_stock_run(tmp_path)
    rep = report.write_report(out)
    stock = rep[rep["suite"] == "stock"]
    ours = rep[rep["suite"] == "smoke"]
    assert len(stock) == 1 and len(ours) == 3
    assert set(stock["compression"]) == {report.STOCK_HELM} and set(ours["compression"]) == {"none"}
    assert set(stock["model"]) == {"flexhelm/smollm2-135m"} and set(ours["model"]) == {"smollm2-135m"}
    assert set(stock["policy"]) == {""} and all(ours["policy"] != "")
    md = (out / "report.md").read_text()
    assert f"| {stock.iloc[0].entry} | flexhelm/smollm2-135m | stock HELM |" in md
    assert not (out / "compression.csv").exists()  # a stock run is no compressed variant of ours
    base, compressed = report.compression_variants(rep)
    assert len(base) == 3 and compressed.empty


def test_a_folder_of_stock_runs_only_is_all_stock(tmp_path):
    out = _plain_output_with_stock_run(tmp_path)
    (out / "manifest.json").unlink()
    assert set(report.load_report(out)["compression"]) == {report.STOCK_HELM}
