"""The closing summary of a harness run: report rows of its HELM runs, each with its status.

The rows come from `runs.run_row`, the very function report.md is made of, and are read back
from the run folders on disk (so runs finished before a `--resume` appear too): the console
and report.md show the same headline metric, value and eval_instances for a run by construction.
"""

from __future__ import annotations

from pathlib import Path

from engine.markdown import markdown_table
from harness.files import read_json
from harness.report.runs import EVAL_INSTANCES_NOTE, entry_of, run_row

COLUMNS = ["entry", "metric", "value", "eval_instances", "tokens_per_s", "effective_batch", "padding_efficiency",
           "cached_requests"]


def summary_table(output: Path, suite: str, outcomes: list[tuple[str, str]], skipped: list[tuple[str, str]]) -> str:
    """Runs of `suite` in `output` as a Markdown table, given (run name, status) pairs (status: done,
    done earlier, failed: ..., not run), then the skipped entries with their reasons."""
    lines = []
    if outcomes:
        manifest = read_json(output / "manifest.json")
        rows = []
        for name, status in outcomes:
            if status.startswith("done"):
                row = run_row(output / "runs" / suite / name, manifest, ".", output)
                rows.append([row[c] for c in COLUMNS] + [status])
            else:
                rows.append([entry_of(name)] + [None] * (len(COLUMNS) - 1) + [status])
        lines += [markdown_table(COLUMNS + ["status"], rows), EVAL_INSTANCES_NOTE]
    if skipped:
        lines.append(f"skipped ({len(skipped)}):")
        lines += [f"  {entry}\n      {reason}" for entry, reason in skipped]
    return "\n".join(lines)
