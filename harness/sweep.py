"""Throughput sweep: generation tokens/s over a range of effective batch sizes.

Why: FlexGen's throughput comes from reusing each loaded layer across a large block, so the
curve of throughput against block size is the figure that shows whether a policy works.
One call measures one model, policy and compression; rows are added to a CSV (a rerun of the
same point replaces it), so several calls build the set of curves the notebook plots.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from engine import Engine
from engine.errors import UserError, cli_main
from engine.flags import ArgumentParser, add_policy_args, policy_from_args
from engine.policy import TIERS, Policy
from harness.report import plots

KEY = ["device", "model", "weights", "policy", "compression", "effective_batch", "prompt_len", "gen_len"]


def device_name() -> str:
    """The compute device the engine picks by default, by name, so curves from two machines stay apart."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}"


def measure(model: str, weights: str | None, policy: Policy, prompt_len: int, gen_len: int,
            load_kwargs: dict, seed: int = 0) -> dict:
    """Load the engine with `policy`, generate one full block of random prompts, return its figures."""
    eng = Engine.load(model, policy=policy, weights=weights, **load_kwargs)
    gen = torch.Generator().manual_seed(seed)
    shape = (policy.block_size, prompt_len)
    prompts = torch.randint(10, eng.config.vocab_size, shape, generator=gen).tolist()
    eng.generate(prompts[: policy.gpu_batch_size], max_new_tokens=2)  # warm-up: allocation, first kernels
    eng.generate(prompts, max_new_tokens=gen_len, seed=seed)
    s = eng.stats
    row = {"device": device_name(), "model": Path(model).name if Path(model).is_dir() else model,
           "weights": weights or "checkpoint",
           "policy": policy.label(),
           "compression": policy.compression_label(), "effective_batch": policy.block_size,
           "gpu_batch_size": policy.gpu_batch_size, "num_gpu_batches": policy.num_gpu_batches,
           "prompt_len": prompt_len, "gen_len": gen_len, "generated_tokens": s.generated_tokens,
           "prefill_s": s.prefill_s, "decode_s": s.decode_s,
           "tokens_per_s": s.tokens_per_s if s.elapsed_s > 0 else float("nan")}
    row.update({f"peak_{t}_bytes": s.peak_bytes[t] for t in TIERS})
    return row


def sweep(model: str, weights: str | None, policy: Policy, batch_sizes: list[int], prompt_len: int,
          gen_len: int, load_kwargs: dict) -> pd.DataFrame:
    """One row per effective batch size; the block is split into policy.num_gpu_batches GPU batches."""
    ngb = policy.num_gpu_batches
    bad = [b for b in batch_sizes if b % ngb]
    if bad:
        raise UserError(f"batch sizes {bad} are not multiples of --num-gpu-batches {ngb}; pick multiples")
    rows = []
    for b in tqdm(batch_sizes, desc=f"sweep {model}", unit="batch size"):
        rows.append(measure(model, weights, dataclasses.replace(policy, gpu_batch_size=b // ngb),
                            prompt_len, gen_len, load_kwargs))
    return pd.DataFrame(rows)


def merge_into(csv: Path, table: pd.DataFrame) -> pd.DataFrame:
    """Add rows to an existing sweep CSV; a rerun point replaces the old one."""
    if csv.exists():
        old = pd.read_csv(csv)
        table = pd.concat([old, table]).drop_duplicates(subset=KEY, keep="last")
    table = table.sort_values(KEY).reset_index(drop=True)
    csv.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(csv, index=False)
    return table


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m harness.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="opt-125m", help="named config or checkpoint folder")
    parser.add_argument("--weights", default="dummy",
                        help="'dummy' for seeded random weights, 'checkpoint' to load the model's own")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32],
                        help="effective batch sizes (gpu batch size x num gpu batches)")
    parser.add_argument("--prompt-len", type=int, default=128, help="tokens per random prompt")
    parser.add_argument("--gen-len", type=int, default=32, help="tokens generated per prompt")
    parser.add_argument("--output", type=Path, default=Path("results/sweep/sweep.csv"),
                        help="CSV to add the rows to; the plot goes next to it as .png")
    add_policy_args(parser)
    args = parser.parse_args(argv)
    if args.policy == "auto":
        parser.error("the sweep fixes the batch sizes itself; give the placement with --percent")
    if min(args.batch_sizes + [args.prompt_len, args.gen_len]) < 1:
        parser.error("--batch-sizes, --prompt-len and --gen-len must be positive")
    load_kwargs = {"gpu_mem": args.gpu_mem, "cpu_mem": args.cpu_mem, "offload_dir": args.offload_dir}
    weights = None if args.weights == "checkpoint" else args.weights
    table = sweep(args.model, weights, policy_from_args(args), args.batch_sizes, args.prompt_len,
                  args.gen_len, load_kwargs)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table[["model", "policy", "compression", "effective_batch", "generated_tokens", "prefill_s",
                     "decode_s", "tokens_per_s", "peak_cpu_bytes", "peak_gpu_bytes"]].to_string(index=False))
    merged = merge_into(args.output, table)
    png = plots.throughput_vs_batch(merged, args.output.with_suffix(".png"), title="Throughput sweep")
    print(f"wrote {args.output} and {png}")


if __name__ == "__main__":
    main()
