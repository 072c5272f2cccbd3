"""lm-eval's `hf` backend against `flexhelm` on an offline MMLU subject, in one process, on SmolLM2-135M.

    python -m harness.bench_lm_eval --limit 20 --output results/lm_eval_bench

Rows: hf, flexhelm with everything in memory, with the weights on disk (percent=0;0;100;0;100;0), and with
4-bit weights and cache. Columns: accuracy, the largest per-sample log-likelihood gap to hf, requests
per second of lm-eval's wall time. Each variant writes its --log_samples folder under --output, so
`harness.regress --baseline OUT/flexhelm --candidate OUT/flexhelm-w4c4` runs on them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from engine.errors import cli_main
from engine.flags import ArgumentParser
from engine.markdown import markdown_table
from engine.weights import embedded_folder
from harness.lm_eval import TASKS_DIR

VARIANTS = {
    "flexhelm": {},
    "flexhelm-disk": {"percent": "0;0;100;0;100;0"},
    "flexhelm-w4c4": {"compress": "both", "comp_bits": 4},
}


def run(model: str, model_args: dict, task: str, limit: int, output: Path) -> tuple[dict, float]:
    """lm-eval's result dict of one backend, written as --log_samples would, and its wall seconds."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    import harness.lm_eval_backend  # noqa: F401  registers flexhelm

    start = time.perf_counter()
    results = simple_evaluate(model=model, model_args=model_args, tasks=[task], limit=limit, log_samples=True,
                              task_manager=TaskManager(include_path=str(TASKS_DIR)), device="cpu", batch_size=32)
    wall = time.perf_counter() - start
    tracker = EvaluationTracker(output_path=str(output))
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples)
    tracker.save_results_samples(task_name=task, samples=samples[task])
    results["samples"] = samples
    return results, wall


def loglikelihoods(results: dict, task: str) -> pd.Series:
    return pd.Series({(s["doc_id"], i): float(r[0][0]) for s in results["samples"][task]
                      for i, r in enumerate(s["resps"])})


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m harness.bench_lm_eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--subject", default="abstract_algebra")
    parser.add_argument("--limit", type=int, default=20, help="questions of the subject")
    parser.add_argument("--output", type=Path, default=Path("results/lm_eval_bench"))
    args = parser.parse_args(argv)
    task, folder = f"flexhelm_mmlu_{args.subject}", str(embedded_folder())
    runs = {"hf": run("hf", {"pretrained": folder, "dtype": "float32"}, task, args.limit, args.output / "hf")}
    for name, extra in VARIANTS.items():
        model_args = {"pretrained": folder, "gpu_batch_size": 8, "num_gpu_batches": 4, **extra}
        runs[name] = run("flexhelm", model_args, task, args.limit, args.output / name)
    ref = loglikelihoods(runs["hf"][0], task)
    rows = []
    for name, (results, wall) in runs.items():
        n = len(loglikelihoods(results, task))
        rows.append({"backend": name, "questions": results["n-samples"][task]["effective"],
                     "accuracy": results["results"][task]["acc,none"],
                     "max |loglik - hf|": float((loglikelihoods(results, task) - ref).abs().max()),
                     "requests/s": n / wall, "× hf": (n / wall) / (len(ref) / runs["hf"][1])})
    table = pd.DataFrame(rows)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "table.json").write_text(json.dumps(rows, indent=2))
    print(markdown_table(list(table.columns), table.values.tolist()))


if __name__ == "__main__":
    main()
