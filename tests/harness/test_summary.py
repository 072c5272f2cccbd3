"""The console summary of harness.run and report.md headline the same metric, value and eval_instances.

The input is the reference's uncompressed smoke output, plus one run whose run group no HELM
schema knows and whose metric spec lists quasi_exact_match before exact_match: there the headline
comes from the metric spec, the case where two separate rules for the headline used to disagree.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness.report import runs as report
from harness.report.summary import summary_table

REFERENCE = Path(__file__).resolve().parents[2] / "results" / "reference" / "smoke" / "none"
SUITE = "smoke"
ODD_RUN = "custom_mmlu:subject=abstract_algebra,model=flexhelm_smollm2-135m"


def _markdown_rows(text: str) -> list[dict[str, str]]:
    """The rows of the first Markdown table in `text`, as {column: cell}."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]]


@pytest.fixture
def output(tmp_path) -> Path:
    out = Path(shutil.copytree(REFERENCE, tmp_path / "out"))
    [mmlu] = (out / "runs" / SUITE).glob("mmlu:*")
    odd = Path(shutil.copytree(mmlu, out / "runs" / SUITE / ODD_RUN))
    spec = json.loads((odd / "run_spec.json").read_text())
    spec["name"], spec["groups"] = ODD_RUN, ["not_a_helm_run_group"]
    for metric_spec in spec["metric_specs"]:
        if "names" in metric_spec.get("args", {}):
            metric_spec["args"]["names"] = ["quasi_exact_match", "exact_match"]
    (odd / "run_spec.json").write_text(json.dumps(spec))
    return out


def test_console_summary_and_report_md_agree(output):
    names = sorted(p.name for p in (output / "runs" / SUITE).iterdir())
    console = _markdown_rows(summary_table(output, SUITE, [(n, "done") for n in names], []))
    report.write_report(output)
    written = {row["entry"]: row for row in _markdown_rows((output / "report.md").read_text())}
    assert sorted(row["entry"] for row in console) == sorted(written) and len(console) == 4
    for row in console:
        for column in ("metric", "value", "eval_instances", "tokens_per_s", "effective_batch"):
            assert row[column] == written[row["entry"]][column], (row["entry"], column)
    odd = next(row for row in console if row["entry"].startswith("custom_mmlu"))
    assert odd["metric"] == "quasi_exact_match"  # the metric spec's first name, as report.main_metric picks


def test_eval_instances_count_the_headline_split_only(output):
    """The smoke runs split their 5 instances between test and valid; eval_instances counts the test ones."""
    names = sorted(p.name for p in (output / "runs" / SUITE).iterdir())
    console = {row["entry"]: row for row in _markdown_rows(summary_table(output, SUITE, [(n, "done") for n in names],
                                                                         []))}
    for name in names:
        stats = json.loads((output / "runs" / SUITE / name / "stats.json").read_text())
        [test] = [s for s in stats if s["name"] == {"name": "num_instances", "split": "test"}]
        assert console[report.entry_of(name)]["eval_instances"] == f"{test['mean']:g}"
    assert {row["eval_instances"] for row in console.values()} == {"5", "3", "2"}
    assert report.EVAL_INSTANCES_NOTE in summary_table(output, SUITE, [(names[0], "done")], [])


def test_runs_that_did_not_finish_show_their_status(output):
    text = summary_table(output, SUITE, [("gsm:model=x,num_output_tokens=64", "failed: RuntimeError: boom")],
                         [("legalbench:subset=proa", "no data")])
    [row] = _markdown_rows(text)
    assert row["entry"] == "gsm:num_output_tokens=64" and row["status"] == "failed: RuntimeError: boom"
    assert row["metric"] == "—" and "skipped (1):" in text and "no data" in text
