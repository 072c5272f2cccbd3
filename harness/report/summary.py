"""The closing summary table of a harness run, read back from the run folders on disk (so runs
finished before a `--resume` appear too)."""

from __future__ import annotations

import os
from functools import cache
from importlib import resources

import pandas as pd
import yaml

from harness.files import read_json

SCHEMAS = ("schema_lite.yaml", "schema_classic.yaml")
FALLBACK_METRICS = ("exact_match", "quasi_exact_match", "final_number_exact_match", "bleu_4", "f1_score")


@cache
def main_metric_by_group() -> dict[str, str]:
    """HELM's own choice of headline metric per run group (`environment.main_name` in its schemas)."""
    names: dict[str, str] = {}
    for schema in reversed(SCHEMAS):  # earlier schemas win
        with resources.files("helm.benchmark.static").joinpath(schema).open() as f:
            for group in yaml.safe_load(f).get("run_groups", []):
                main = (group.get("environment") or {}).get("main_name")
                if main and "$" not in main:
                    names[group["name"]] = main
    return names


def _metric(stats: list[dict], name: str) -> float | None:
    for split in ("test", "valid"):
        for stat in stats:
            n = stat["name"]
            if n["name"] == name and n.get("split") == split and "perturbation" not in n and stat.get("count"):
                return stat.get("mean")
    return None


def run_row(run_dir: str) -> dict:
    """One summary row from a finished HELM run folder."""
    run_spec = read_json(os.path.join(run_dir, "run_spec.json"))
    stats = read_json(os.path.join(run_dir, "stats.json"))
    engine_path = os.path.join(run_dir, "engine_stats.json")
    engine = read_json(engine_path) if os.path.exists(engine_path) else {}
    groups = main_metric_by_group()
    candidates = [groups[g] for g in run_spec.get("groups", []) if g in groups] + list(FALLBACK_METRICS)
    metric, value = next(((m, v) for m in candidates if (v := _metric(stats, m)) is not None), (None, None))
    return {
        "run": run_spec["name"], "metric": metric, "value": value,
        "instances": sum(s["sum"] for s in stats if s["name"]["name"] == "num_instances"
                         and "perturbation" not in s["name"]),
        "tok/s": engine.get("generated_tokens_per_s"), "mean batch": engine.get("mean_batch_size"),
        "padding eff.": engine.get("padding_efficiency"), "cached": engine.get("cached_requests"),
        "status": "",
    }


def summary_table(rows: list[dict], skipped: list[tuple[str, str]]) -> str:
    """The runs as a table (status: done, done earlier, failed: ...), then skipped entries with reasons."""
    lines = []
    if rows:
        frame = pd.DataFrame(rows, columns=["run", "metric", "value", "instances", "tok/s", "mean batch",
                                            "padding eff.", "cached", "status"])
        with pd.option_context("display.max_colwidth", 90, "display.width", 250, "display.max_rows", None):
            lines.append(frame.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.3g}"))
    if skipped:
        lines.append(f"skipped ({len(skipped)}):")
        lines += [f"  {entry}\n      {reason}" for entry, reason in skipped]
    return "\n".join(lines)
