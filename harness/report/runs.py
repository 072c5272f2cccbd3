"""Turn a harness output folder into pandas reports: one row per HELM run and variant.

Why a module of its own: users read results as tables and plots, and `harness.regress`, the
notebook and the tests all need the same numbers, read the same way from the files HELM and the
engine wrote.

Output layout read (issue 5 contract, plus `harness.run --compare-compression`):

    O/manifest.json                       model, policy (Policy.to_dict()), compression label, ...
    O/runs/<suite>/<run>/run_spec.json    HELM
    O/runs/<suite>/<run>/stats.json       HELM, aggregated metrics
    O/runs/<suite>/<run>/per_instance_stats.json
    O/runs/<suite>/<run>/scenario_state.json       requests and completions (predictions)
    O/runs/<suite>/<run>/engine_stats.json         engine figures summed over the run

A *variant* is any folder V at O or one level below it (O/<name>/) that holds `runs/`; its
compression label comes from V/manifest.json (or from a run's engine_stats.json "compression"
key, which wins). `--compare-compression` writes one complete output per setting:
`O/none/` and `O/<label>/` (e.g. `O/w4c4/`), each with its own manifest.json and runs/.
Runs of different variants are paired by their run entry: the run name without `model=`.
A run that no flexhelm manifest describes (no V/manifest.json, or a suite other than the
manifest's: a stock `helm-run -o V --suite stock`) is labelled `stock HELM`, with HELM's model
deployment as its model, and is never paired as a compression variant.

Writes `O/report.csv`, `O/report.md`, `O/throughput.png`; with an uncompressed and a
compressed variant also `O/compression.csv` and `O/accuracy_compression.png`.
"""

from __future__ import annotations

import functools
import json
import math
from collections import defaultdict
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from engine.errors import UserError, cli_main
from engine.flags import ArgumentParser
from engine.markdown import markdown_table
from engine.policy import TIERS, Policy

UNCOMPRESSED = "none"
STOCK_HELM = "stock HELM"  # the compression label of runs no flexhelm manifest describes
EVAL_INSTANCES_NOTE = ("eval_instances: the instances HELM scored for the headline metric on its split "
                       "(each instance once, whatever its train trials)")
# The HELM schemas that name each run group's main metric (environment.main_name / main_split).
_SCHEMAS = ("schema_lite.yaml", "schema_classic.yaml", "schema_mmlu.yaml")


# -- reading one run ---------------------------------------------------------------------------

def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); rerun the harness with --resume to rewrite it") \
            from None


@functools.lru_cache(maxsize=1)
def _main_metrics_by_group() -> dict[str, tuple[str, str]]:
    """HELM run group -> (main metric, main split), from the schemas shipped in crfm-helm."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    table: dict[str, tuple[str, str]] = {}
    for name in _SCHEMAS:
        schema = yaml.load(resources.files("helm.benchmark.static").joinpath(name).read_text(), loader)
        for group in schema.get("run_groups", []):
            env = group.get("environment") or {}
            if "main_name" in env and "$" not in env["main_name"]:
                table.setdefault(group["name"], (env["main_name"], env.get("main_split", "test")))
    return table


def main_metric(run_spec: dict, stats: list[dict]) -> tuple[str, str]:
    """(metric, split) HELM headlines for this run: its group's schema entry, else the first metric.

    The one place the headline is chosen: report.md, harness.regress and the console summary of
    `harness.run` all read it from `run_row`, so they never disagree."""
    names = {(s["name"]["name"], s["name"].get("split")) for s in stats if s.get("count")}
    schema = _main_metrics_by_group()
    candidates = [schema[g] for g in run_spec.get("groups", []) if g in schema]
    for spec in run_spec.get("metric_specs", []):
        candidates += [(n, "test") for n in spec.get("args", {}).get("names", [])]
    for metric, split in candidates:
        for s in (split, "test", "valid"):
            if (metric, s) in names:
                return metric, s
    raise UserError(f"run {run_spec.get('name')} has no main metric in stats.json; the HELM run did not "
                    "finish: rerun it with --resume")


def _plain(name: dict, metric: str, split: str) -> bool:
    return (name["name"] == metric and name.get("split") == split and not name.get("sub_split")
            and not name.get("perturbation"))


def _instance_key(instance_id: str, trial: int, perturbation: dict | None) -> str:
    suffix = f"|{perturbation['name']}" if perturbation else ""
    return f"{instance_id}#{trial}{suffix}"


def instance_values(run_dir: Path, metric: str, split: str) -> pd.Series:
    """Per-instance value of `metric` on `split`, indexed by instance key (id, trial, perturbation)."""
    values = {}
    for record in _read_json(run_dir / "per_instance_stats.json") or []:
        for stat in record["stats"]:
            if _plain(stat["name"], metric, split) and stat.get("count"):
                key = _instance_key(record["instance_id"], record["train_trial_index"],
                                    record.get("perturbation"))
                values[key] = stat["sum"] / stat["count"]
    return pd.Series(values, dtype=float, name=metric)


def eval_instances(values: pd.Series) -> int:
    """How many distinct instances `instance_values` holds (trials and perturbations of one count once)."""
    return len({key.partition("#")[0] for key in values.index})


def predictions(run_dir: Path) -> pd.Series:
    """Each instance's prediction: its generated texts, or for likelihood scoring the best reference."""
    states = (_read_json(run_dir / "scenario_state.json") or {}).get("request_states", [])
    by_instance: dict[str, list[dict]] = defaultdict(list)
    for state in states:
        inst = state["instance"]
        key = _instance_key(inst["id"], state["train_trial_index"], inst.get("perturbation"))
        by_instance[key].append(state)
    out = {}
    for key, group in by_instance.items():
        generated = [s for s in group if s["request"].get("max_tokens", 1) > 0 and s.get("result")]
        if generated:
            out[key] = "\x1f".join(c["text"].strip() for s in generated for c in s["result"]["completions"])
        else:  # echo + max_tokens=0: HELM picks the reference with the highest logprob
            scored = [(s["result"]["completions"][0]["logprob"], s.get("reference_index"))
                      for s in group if s.get("result") and s.get("request_mode") in (None, "original")]
            out[key] = str(max(scored, key=lambda x: x[0])[1]) if scored else ""
    return pd.Series(out, dtype=object, name="prediction")


def entry_of(run_name: str) -> str:
    """Run entry without the model, so the same entry pairs up across variants."""
    scenario, _, args = run_name.partition(":")
    kept = [a for a in args.split(",") if a and not a.startswith(("model=", "model_deployment="))]
    return scenario + (":" + ",".join(kept) if kept else "")


def _stat_mean(stats: list[dict], metric: str, split: str) -> float:
    for s in stats:
        if _plain(s["name"], metric, split) and s.get("count"):
            return s["mean"]
    return math.nan


def run_row(run_dir: Path, manifest: dict | None, variant: str, output_dir: Path) -> dict:
    """One report row from a HELM run folder, its engine_stats.json and the variant's manifest
    (None for a stock HELM run, which no flexhelm manifest describes)."""
    run_spec = _read_json(run_dir / "run_spec.json")
    stats = _read_json(run_dir / "stats.json") or []
    engine = _read_json(run_dir / "engine_stats.json") or {}
    metric, split = main_metric(run_spec, stats)
    values = instance_values(run_dir, metric, split)
    n = len(values)
    adapter = run_spec["adapter_spec"]
    if manifest is None:
        model, policy, compression = adapter.get("model_deployment") or adapter.get("model"), "", STOCK_HELM
    else:
        model = manifest.get("model") or adapter.get("model")
        policy = Policy(**manifest["policy"]).label() if manifest.get("policy") else ""
        compression = engine.get("compression") or manifest.get("compression") or UNCOMPRESSED
    gen = engine.get("generated_tokens", math.nan)
    padded = engine.get("padded_prompt_tokens") or math.nan
    seconds = engine.get("prefill_s", math.nan) + engine.get("decode_s", math.nan)
    row = {
        "variant": variant,
        "path": str(run_dir.relative_to(output_dir)),
        "suite": run_dir.parent.name,
        "run": run_spec["name"],
        "entry": entry_of(run_spec["name"]),
        "scenario": run_spec["name"].split(":")[0],
        "method": adapter.get("method", ""),
        "model": model,
        "policy": policy,
        "compression": compression,
        "eval_instances": eval_instances(values),
        "metric": metric,
        "split": split,
        "value": _stat_mean(stats, metric, split),
        "stderr": float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
        "prompt_tokens": engine.get("prompt_tokens", math.nan),
        "padded_prompt_tokens": engine.get("padded_prompt_tokens", math.nan),
        "generated_tokens": gen,
        "padding_efficiency": engine.get("prompt_tokens", math.nan) / padded,
        "prefill_s": engine.get("prefill_s", math.nan),
        "decode_s": engine.get("decode_s", math.nan),
        "tokens_per_s": gen / seconds if seconds and seconds > 0 else math.nan,
        # MMLU-style runs generate one token each: their cost is prompt processing
        "prompt_tokens_per_s": engine.get("prompt_tokens", math.nan) / engine["prefill_s"]
        if engine.get("prefill_s") else math.nan,
        "effective_batch": engine.get("mean_batch_size", _stat_mean(stats, "batch_size", split)),
        "cached_requests": engine.get("cached_requests", math.nan),
    }
    for tier in TIERS:
        row[f"peak_{tier}_bytes"] = (engine.get("peak_bytes") or {}).get(tier, math.nan)
        row[f"read_{tier}_bytes"] = (engine.get("bytes_read") or {}).get(tier, math.nan)
    return row


# -- reading an output folder ------------------------------------------------------------------

def find_variants(output_dir: Path) -> dict[str, Path]:
    """Variant name -> folder holding runs/: the output itself ('.') and its direct subfolders."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise UserError(f"output folder {output_dir} does not exist; pass the --output of a harness run")
    candidates = [output_dir] + sorted(p for p in output_dir.iterdir() if p.is_dir())
    found = {("." if p == output_dir else p.name): p for p in candidates
             if any((p / "runs").glob("*/*/run_spec.json"))}
    if not found:
        raise UserError(f"{output_dir} holds no HELM runs (no runs/<suite>/<run>/run_spec.json); "
                        "pass the --output folder of a finished harness run")
    return found


def run_dirs(variant_dir: Path) -> list[Path]:
    return sorted(p.parent for p in (variant_dir / "runs").glob("*/*/run_spec.json")
                  if (p.parent / "stats.json").exists())


def load_report(output_dir: str | Path) -> pd.DataFrame:
    """All runs of all variants under an output folder, one row per run and variant."""
    output_dir = Path(output_dir)
    rows = []
    for variant, folder in find_variants(output_dir).items():
        manifest = _read_json(folder / "manifest.json")
        for run_dir in run_dirs(folder):
            ours = manifest is not None and manifest.get("suite") == run_dir.parent.name
            rows.append(run_row(run_dir, manifest if ours else None, variant, output_dir))
    if not rows:
        raise UserError(f"{output_dir} holds no finished HELM runs (no stats.json); "
                        "finish the run with --resume")
    return pd.DataFrame(rows)


def compression_variants(report: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(uncompressed runs, compressed runs) of a report; stock HELM runs belong to neither."""
    ours = report[report["compression"] != STOCK_HELM]
    return ours[ours["compression"] == UNCOMPRESSED], ours[ours["compression"] != UNCOMPRESSED]


def pair_runs(base: pd.DataFrame, cand: pd.DataFrame) -> pd.DataFrame:
    """Runs of two reports paired by run entry (columns suffixed _base and _cand)."""
    return base.merge(cand, on=["suite", "entry"], suffixes=("_base", "_cand"))


def paired_instances(base_dir: Path, cand_dir: Path, metric: str, split: str) -> pd.DataFrame:
    """Per-instance values and predictions of two runs of the same entry, on shared instances."""
    frame = pd.concat({"base": instance_values(base_dir, metric, split),
                       "cand": instance_values(cand_dir, metric, split),
                       "pred_base": predictions(base_dir), "pred_cand": predictions(cand_dir)}, axis=1)
    return frame.dropna(subset=["base", "cand"])


def changed_rate(inst: pd.DataFrame) -> float:
    """Fraction of paired instances whose prediction differs (NaN without scenario_state.json)."""
    known = inst.dropna(subset=["pred_base", "pred_cand"])
    return float((known["pred_base"] != known["pred_cand"]).mean()) if len(known) else math.nan


def _peak_total(row: pd.Series, suffix: str) -> float:
    """Peak bytes summed over tiers (NaN when the engine reported none)."""
    peaks = [row[f"peak_{t}_bytes{suffix}"] for t in TIERS]
    return float(np.nansum(peaks)) if not all(pd.isna(peaks)) and np.nansum(peaks) > 0 else math.nan


def compression_table(output_dir: str | Path, report: pd.DataFrame) -> pd.DataFrame:
    """Each compressed variant against the uncompressed one: metric delta, changed predictions, ratios."""
    output_dir = Path(output_dir)
    base, compressed = compression_variants(report)
    rows = []
    for label, cand in compressed.groupby("compression"):
        for _, p in pair_runs(base, cand).iterrows():
            inst = paired_instances(output_dir / p["path_base"], output_dir / p["path_cand"],
                                    p["metric_base"], p["split_base"])
            rows.append({
                "suite": p["suite"], "entry": p["entry"], "scenario": p["scenario_base"],
                "model": p["model_base"], "compression": label, "metric": p["metric_base"],
                "paired_instances": len(inst),
                "value_uncompressed": p["value_base"], "value_compressed": p["value_cand"],
                "metric_delta": p["value_cand"] - p["value_base"],
                "changed_prediction_rate": changed_rate(inst),
                "throughput_ratio": p["tokens_per_s_cand"] / p["tokens_per_s_base"],
                "memory_ratio": _peak_total(p, "_cand") / _peak_total(p, "_base"),
            })
    return pd.DataFrame(rows)


SWEEP_COLUMNS = ["model", "policy", "compression", "effective_batch", "tokens_per_s"]


def load_sweep(csv: str | Path) -> pd.DataFrame:
    """A throughput sweep table written by `python -m harness.sweep`."""
    try:
        table = pd.read_csv(csv)
    except FileNotFoundError:
        raise UserError(f"sweep table {csv} does not exist; make it with python -m harness.sweep") from None
    missing = [c for c in SWEEP_COLUMNS if c not in table.columns]
    if missing:
        raise UserError(f"{csv} lacks columns {missing}; it is not a harness.sweep table, rerun the sweep")
    return table


# -- writing -----------------------------------------------------------------------------------

def frame_table(frame: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table (pandas' to_markdown needs tabulate, which we do not depend on)."""
    return markdown_table(frame.columns, frame.itertuples(index=False)) + "\n"


SUMMARY_COLUMNS = ["entry", "model", "compression", "eval_instances", "metric", "value", "stderr", "tokens_per_s",
                   "prompt_tokens_per_s", "effective_batch", "padding_efficiency", "peak_gpu_bytes",
                   "peak_cpu_bytes", "peak_disk_bytes"]


def summary(report: pd.DataFrame) -> pd.DataFrame:
    """The columns people read first, with memory in MiB."""
    out = report[SUMMARY_COLUMNS].copy()
    for tier in TIERS:
        out[f"peak_{tier}_bytes"] = out[f"peak_{tier}_bytes"] / 2**20
    return out.rename(columns={f"peak_{t}_bytes": f"peak_{t}_MiB" for t in TIERS})


def write_report(output_dir: str | Path) -> pd.DataFrame:
    """Write report.csv/.md, compression.csv and the PNG plots into the output folder; return the report."""
    from harness.report import plots

    output_dir = Path(output_dir)
    report = load_report(output_dir)
    report.to_csv(output_dir / "report.csv", index=False)
    text = f"# Report: {output_dir}\n\n" + frame_table(summary(report)) + f"\n{EVAL_INSTANCES_NOTE}\n"
    plots.throughput_vs_batch(report, output_dir / "throughput.png", title="Generation throughput per run",
                              lines=False)
    base, compressed = compression_variants(report)
    if len(base) and len(compressed):
        comp = compression_table(output_dir, report)
        comp.to_csv(output_dir / "compression.csv", index=False)
        plots.accuracy_by_compression(comp, output_dir / "accuracy_compression.png")
        text += "\n## Compression\n\n" + frame_table(comp.drop(columns=["suite", "scenario"]))
    (output_dir / "report.md").write_text(text)
    return report


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m harness.report", description=__doc__.split("\n")[0])
    parser.add_argument("output_dir", help="the --output folder of a harness run")
    args = parser.parse_args(argv)
    report = write_report(args.output_dir)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(summary(report).to_string(index=False))
    print(f"wrote {Path(args.output_dir) / 'report.md'}")
