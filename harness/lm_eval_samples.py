"""Per-sample results of an lm-eval `--output_path DIR --log_samples` run, paired for harness.regress.

lm-eval writes DIR/<model>/results_<time>.json (configs, model_args) and one samples_<task>_<time>.jsonl
per task. A sample's score is the task's first metric; its prediction is what the model chose: the
highest-scoring choice of a multiple-choice task, else the filtered answer text. The newest file of each
kind wins when a folder holds several runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from engine.errors import UserError
from harness.lm_eval_args import policy_of


def is_lm_eval_output(folder: Path) -> bool:
    return folder.is_dir() and (any(folder.glob("*/results_*.json")) or any(folder.glob("results_*.json")))


@dataclass
class Entry:
    """One task of a run: its per-sample scores and predictions, and how to judge them."""

    task: str
    metric: str
    multiple_choice: bool
    samples: pd.DataFrame  # index doc_id; columns value, pred


def _newest(folder: Path, pattern: str) -> Path | None:
    files = sorted(folder.glob(f"*/{pattern}")) + sorted(folder.glob(pattern))
    return max(files, key=lambda p: p.name) if files else None


def _prediction(sample: dict, multiple_choice: bool) -> str:
    resps = sample["filtered_resps"]
    if multiple_choice:
        scores = [float(r[0]) if isinstance(r, list | tuple) else float(r) for r in resps]
        return str(max(range(len(scores)), key=scores.__getitem__))
    return str(resps[0] if isinstance(resps, list) else resps)


def read_output(folder: Path) -> tuple[str, dict[str, Entry]]:
    """(the run's label, its entries by task) from an lm-eval output folder."""
    results = _newest(folder, "results_*.json")
    if results is None:
        raise UserError(f"{folder} holds no lm-eval results_*.json; run lm-eval with --output_path and --log_samples")
    info = json.loads(results.read_text())
    stamp = results.stem.removeprefix("results_")
    entries = {}
    for task, config in info["configs"].items():
        path = results.parent / f"samples_{task}_{stamp}.jsonl"
        if not path.is_file():
            raise UserError(f"{path} is missing; rerun lm-eval with --log_samples")
        metric = config["metric_list"][0]["metric"]
        mc = config.get("output_type") == "multiple_choice"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        first = rows[0].get("filter") if rows else None  # a task with several filters is judged on its first
        frame = pd.DataFrame([{"doc_id": r["doc_id"], "value": float(r[metric]), "pred": _prediction(r, mc)}
                              for r in rows if r.get("filter") == first], columns=["doc_id", "value", "pred"])
        entries[task] = Entry(task, metric, mc, frame.set_index("doc_id"))
    return _label(info.get("config", {})), entries


def _label(config: dict) -> str:
    """The model and, for flexhelm, its compression (none, w4, w4c4, ...)."""
    model, args = config.get("model", "?"), config.get("model_args") or {}
    if model != "flexhelm" or not isinstance(args, dict):
        return str(model)
    return f"flexhelm-{policy_of(args).compression_label()}"


def paired(base: Path, cand: Path) -> list[tuple[str, str, str, bool, pd.DataFrame]]:
    """(task, variants, metric, multiple choice, frame of base/cand/pred_base/pred_cand) for shared tasks."""
    base_label, base_entries = read_output(base)
    cand_label, cand_entries = read_output(cand)
    out = []
    for task in sorted(base_entries.keys() & cand_entries.keys()):
        b, c = base_entries[task], cand_entries[task]
        frame = b.samples.join(c.samples, lsuffix="_base", rsuffix="_cand", how="inner")
        frame = frame.rename(columns={"value_base": "base", "value_cand": "cand"})
        out.append((task, f"{base_label}->{cand_label}", b.metric, b.multiple_choice, frame))
    return out
