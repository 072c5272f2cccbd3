"""`python -m harness.scale_out_bench`: what distribution costs, measured, and what more GPUs would give.

    python -m harness.scale_out_bench --repeat 2

Measured: the same HELM runs (MMLU, 2 subjects x 20 instances, SmolLM2-135M) on 2 Ray replicas x 1 thread
against 1 replica x 2 threads, on the same cores, in one command, configurations interleaved. Throughput is
requests (and prompt tokens) over the replicas' serving wall time, from the first block handed out to the
last result; replica start-up (one engine load each) is shown apart. A ratio near 1 means the driver, Ray
and the request cache cost nothing that matters, so N replicas serve N times one replica's throughput.

Predicted: that one replica's throughput comes from the cost model (engine.planner) for a model and a
hardware profile, with each replica's host memory its share of the host's; N GPUs give N times it.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engine.errors import UserError, cli_main
from engine.flags import ArgumentParser
from engine.markdown import markdown_table
from engine.planner.measure import load_hardware
from engine.planner.search import search_policy
from engine.weights import resolve

CONFIGS = {"1 replica x 2 threads": (1, 2), "2 replicas x 1 thread": (2, 1)}
SUBJECTS = ("abstract_algebra", "anatomy")


def run_once(workers: int, threads: int, args, output: Path) -> dict:
    """One harness run on `workers` replicas; the replicas' figures summed over the runs."""
    entries = [f"mmlu:model=text,subject={s}" for s in SUBJECTS]
    cmd = [sys.executable, "-m", "harness.run", "--run-entries", *entries, "--model", args.model,
           "--max-eval-instances", str(args.instances), "--gpu-batch-size", "4", "--num-gpu-batches", "2",
           "--workers", str(workers), "--threads-per-worker", str(threads), "--output", str(output)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise UserError(f"the run on {workers} x {threads} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    total = time.perf_counter() - started
    stats = [json.loads(p.read_text()) for p in output.glob("runs/*/*/engine_stats.json")]
    serve_s = stats[0]["distributed"]["wall_s"]
    return {"requests": sum(s["computed_requests"] for s in stats),
            "prompt_tokens": sum(s["prompt_tokens"] for s in stats), "serve_s": serve_s, "total_s": total}


def predicted(model: str, hardware: str, replicas_per_host: list[int], prompt_len: int, gen_len: int) -> list[list]:
    """Cost-model tok/s of one replica when k replicas share a host's memory, and of N GPUs."""
    cfg, _ = resolve(model, "dummy")
    hw = load_hardware(hardware)
    rows = []
    for k in replicas_per_host:
        result = search_policy(cfg, hw, prompt_len=prompt_len, gen_len=gen_len, cpu_mem=hw.cpu_mem // k)
        rows.append([k, f"{hw.cpu_mem / k / 2**30:.0f}", f"{result.throughput_tok_s:.2f}",
                     *(f"{result.throughput_tok_s * n:.1f}" for n in (1, 2, 4, 8))])
    return rows


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m harness.scale_out_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared/data/helm-scenarios"))
    p.add_argument("--instances", type=int, default=20, help="instances per MMLU subject")
    p.add_argument("--repeat", type=int, default=2, help="interleaved repeats of each configuration")
    p.add_argument("--predict-model", default="opt-30b")
    p.add_argument("--predict-hardware", default="t4-paper")
    args = p.parse_args(argv)
    if not Path(args.data_dir).is_dir():
        raise UserError(f"--data-dir {args.data_dir} is not a folder; pass HELM's scenario cache folder")
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="scale-out-bench-") as tmp:
        for rep in range(args.repeat):
            for name, (workers, threads) in CONFIGS.items():
                print(f"repeat {rep + 1}/{args.repeat}: {name} ...", file=sys.stderr, flush=True)
                runs[name].append(run_once(workers, threads, args, Path(tmp) / f"{workers}x{threads}-{rep}"))
    rows, rate = [], {}
    for name, results in runs.items():
        rate[name] = statistics.median(r["requests"] / r["serve_s"] for r in results)
        rows.append([name, results[0]["requests"], f"{rate[name]:.2f}",
                     f"{statistics.median(r['prompt_tokens'] / r['serve_s'] for r in results):.0f}",
                     f"{statistics.median(r['serve_s'] for r in results):.1f}",
                     f"{statistics.median(r['total_s'] - r['serve_s'] for r in results):.1f}"])
    base = rate["1 replica x 2 threads"]
    for row, name in zip(rows, runs, strict=True):
        row.append(f"{rate[name] / base:.2f}x")
    print(f"MMLU {' + '.join(SUBJECTS)}, {args.instances} instances each, {args.model}, same 2 cores; "
          f"medians of {args.repeat} interleaved repeats\n")
    print(markdown_table(["configuration", "requests", "requests/s", "prompt tok/s", "serving s",
                          "start-up and fan-in s", "vs 1x2"], rows))
    print(f"\ncost model: {args.predict_model}, {args.predict_hardware}, prompt 512, gen 32; one GPU per replica\n")
    print(markdown_table(["replicas per host", "host GiB each", "tok/s per replica", "1 GPU", "2 GPUs", "4 GPUs",
                          "8 GPUs"], predicted(args.predict_model, args.predict_hardware, [1, 2, 4], 512, 32)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
