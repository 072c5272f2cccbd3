"""Regression check for quantization accuracy: exit 0 pass, 1 regression, 2 usage error.

Why two tests per run entry: small models sit near chance on many scenarios, so a broken
quantizer can leave accuracy where it was while answering differently; the changed-prediction
fraction sees that. Each test fails only when the point estimate passes its threshold *and* a
one-sided test says so at --alpha, so a few unlucky instances of a small run do not fail it:
- accuracy: drop in points > --max-drop, with a paired test of "candidate worse" (McNemar exact
  for 0/1 metrics, a paired bootstrap otherwise);
- predictions: changed fraction > --max-changed, with a binomial test against --max-changed.
  Only multiple-choice entries are gated on it: a free-form answer (a GSM worked solution)
  changes its text under any perturbation of the weights, so there accuracy decides alone.

Calibration of the defaults (SmolLM2-135M, MMLU abstract_algebra and us_foreign_policy, 100 test
instances each, uncompressed against weights compressed to 4 and 2 bits; commands in docs/measurements.md):
4-bit changed 46% and 22% of the answers (upper 95% bounds 0.56 and 0.31) with accuracy +6 and +2
points; 2-bit changed 100% and lost 25 and 24 points. --max-changed 0.6 sits above 4-bit's bounds
and far below 2-bit; --max-changed 0.3 would fail the good 4-bit abstract_algebra run. With all
answers changed, the binomial test is decisive from 6 instances per entry (0.6**6 < 0.05).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from engine.errors import UserError, cli_main
from engine.flags import ArgumentParser
from harness.lm_eval_samples import is_lm_eval_output, paired
from harness.report.runs import changed_rate, compression_variants, load_report, pair_runs, paired_instances

DEFAULT_MAX_DROP = 5.0  # points
DEFAULT_MAX_CHANGED = 0.60  # 4-bit SmolLM2-135M changes 22-46% of MMLU answers, 2-bit 100%
BOOTSTRAP_SAMPLES = 10_000


def drop_p_value(base: np.ndarray, cand: np.ndarray, seed: int = 0) -> float:
    """One-sided p-value of "the candidate scores lower" on paired per-instance values."""
    if np.isin(base, (0.0, 1.0)).all() and np.isin(cand, (0.0, 1.0)).all():
        worse = int(((base == 1) & (cand == 0)).sum())
        better = int(((base == 0) & (cand == 1)).sum())
        if worse + better == 0:
            return 1.0
        return stats.binomtest(worse, worse + better, 0.5, alternative="greater").pvalue
    diff = base - cand
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(BOOTSTRAP_SAMPLES, len(diff)))].mean(axis=1)
    return float((means <= 0).mean())


def changed_p_value(changed: int, n: int, max_changed: float) -> float:
    """One-sided p-value of "more than max_changed of the predictions changed"."""
    return stats.binomtest(changed, n, max_changed, alternative="greater").pvalue if n else 1.0


def compare(base: pd.DataFrame, cand: pd.DataFrame, base_root: Path, cand_root: Path,
            max_drop: float, max_changed: float, alpha: float) -> pd.DataFrame:
    """One row per paired run entry: accuracy drop and changed predictions, with p-values and verdict."""
    rows = []
    for _, p in pair_runs(base, cand).iterrows():
        inst = paired_instances(base_root / p["path_base"], cand_root / p["path_cand"],
                                p["metric_base"], p["split_base"])
        if len(inst) == 0:
            continue
        if np.isnan(changed_rate(inst)):
            raise UserError(f"{p['run_base']} or {p['run_cand']} lacks scenario_state.json, so predictions cannot be "
                            "compared; copy whole HELM run folders")
        rows.append(judge(p["entry"], f"{p['compression_base']}->{p['compression_cand']}", p["metric_base"],
                          str(p["method_base"]).startswith("multiple_choice"), inst, max_drop, max_changed, alpha))
    return pd.DataFrame(rows)


def judge(entry: str, variants: str, metric: str, categorical: bool, inst: pd.DataFrame, max_drop: float,
          max_changed: float, alpha: float) -> dict:
    """The verdict row of one entry from its paired instances (columns base, cand, pred_base, pred_cand)."""
    n = len(inst)
    drop = 100 * (inst["base"].mean() - inst["cand"].mean())
    changed = changed_rate(inst)
    p_drop = drop_p_value(inst["base"].to_numpy(float), inst["cand"].to_numpy(float))
    p_changed = changed_p_value(round(changed * n), n, max_changed)
    failed = [name for name, bad in (("accuracy", drop > max_drop and p_drop < alpha),
                                     ("changed", categorical and changed > max_changed and p_changed < alpha))
              if bad]
    return {"entry": entry, "variants": variants, "n": n, "checks": "accuracy+changed" if categorical else "accuracy",
            "metric": metric, "base": inst["base"].mean(), "cand": inst["cand"].mean(), "drop_pts": drop,
            "p_drop": p_drop, "changed": changed, "p_changed": p_changed,
            "verdict": "FAIL " + "+".join(failed) if failed else "ok"}


def _split_variants(candidate: Path, baseline: Path | None) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    """(baseline runs, candidate runs, baseline root) following the usage rules in the module doc."""
    cand = load_report(candidate)
    if baseline is None:
        plain, compressed = compression_variants(cand)
        if plain.empty or compressed.empty:
            raise UserError(f"{candidate} holds no uncompressed and compressed variant pair; pass --baseline "
                            "DIR, or a candidate made with harness.run --compare-compression")
        return plain, compressed, candidate
    base = load_report(baseline)
    if base["compression"].nunique() > 1:
        base = compression_variants(base)[0]
    return base, cand, baseline


def regress(candidate: Path, baseline: Path | None, max_drop: float, max_changed: float,
            alpha: float) -> pd.DataFrame:
    if baseline is not None and is_lm_eval_output(candidate) and is_lm_eval_output(baseline):
        table = pd.DataFrame([judge(task, variants, metric, mc, inst, max_drop, max_changed, alpha)
                              for task, variants, metric, mc, inst in paired(baseline, candidate)
                              if len(inst)])
    else:
        base, cand, base_root = _split_variants(candidate, baseline)
        table = compare(base, cand, base_root, candidate, max_drop, max_changed, alpha)
    if table.empty:
        raise UserError(f"no run entry with shared instances between {baseline or candidate} and {candidate}; "
                        "run the same suite and instances on both")
    return table


def _usage_errors_exit_2(func):
    """A usage error (missing folder, no HELM runs) exits 2, as argparse does, not 1."""
    def wrapper(argv: list[str] | None = None) -> None:
        try:
            func(argv)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
    return wrapper


@cli_main
@_usage_errors_exit_2
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m harness.regress", description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, help="output folder to compare against, e.g. a stored one; or an "
                        "lm-eval --output_path folder (run with --log_samples), with --candidate another")
    parser.add_argument("--candidate", type=Path, required=True, help="output folder under test")
    parser.add_argument("--max-drop", type=float, default=DEFAULT_MAX_DROP,
                        help="accuracy drop allowed, in points")
    parser.add_argument("--max-changed", type=float, default=DEFAULT_MAX_CHANGED,
                        help="fraction of changed predictions allowed")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level of the one-sided tests")
    args = parser.parse_args(argv)
    if not 0 < args.alpha < 1 or not 0 <= args.max_changed <= 1 or args.max_drop < 0:
        parser.error("--alpha must lie in (0, 1), --max-changed in [0, 1], --max-drop must be >= 0")
    table = regress(args.candidate, args.baseline, args.max_drop, args.max_changed, args.alpha)
    with pd.option_context("display.width", 200, "display.max_columns", 20,
                           "display.float_format", "{:.3g}".format):
        print(table.to_string(index=False))
    failed = table["verdict"] != "ok"
    print(f"{'REGRESSION' if failed.any() else 'PASS'}: {int(failed.sum())} of {len(table)} run entries fail "
          f"(max drop {args.max_drop:g} points, max changed {args.max_changed:g}, alpha {args.alpha:g})")
    sys.exit(1 if failed.any() else 0)


if __name__ == "__main__":
    main()
