"""`python -m engine.bench.cache_keys`: decode speed of a 4-bit KV cache, keys per channel against per token.

Keys grouped per channel (engine.channel_keys, the default) decode the same bytes per step as FlexGen's
per-token keys, encode once per block instead of every step, and join the stored blocks with the window.
This measures what that costs against per-token keys and an uncompressed cache, in one process with
alternating runs (ratios, since the machines are noisy), on a cache that stays resident and on one
streamed from disk. Correctness is tests/engine's business (test_kv_cache, test_engine_compression).

    python -m engine.bench.cache_keys                    # OPT-125m shapes, B=8, prompt 512, 64 new tokens
    python -m engine.bench.cache_keys --placement disk --repeat 3
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile

import torch
from tqdm import tqdm

from engine.api import Engine
from engine.errors import cli_main
from engine.flags import ArgumentParser
from engine.markdown import markdown_table
from engine.policy import Policy

VARIANTS = {"uncompressed": {}, "c4 token keys": dict(compress_cache=True, comp_cache_keys="token"),
            "c4 channel keys": dict(compress_cache=True, comp_cache_keys="channel")}
PLACEMENTS = {"resident": (100, 0, 100, 0, 100, 0), "disk": (100, 0, 0, 0, 100, 0)}


def measure(model: str, placement: str, batch: int, prompt_len: int, gen_len: int, repeat: int,
            threads: int | None) -> dict[str, list[float]]:
    """Decode tok/s per variant, one list entry per repeat; the variants alternate within each repeat."""
    prompts = [[2 + (i + j) % 100 for j in range(prompt_len)] for i in range(batch)]
    runs: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="flexhelm-cache-keys-") as tmp:
        for _ in tqdm(range(repeat), desc="repeats", unit="repeat"):
            for name, change in VARIANTS.items():
                policy = dataclasses.replace(Policy(gpu_batch_size=batch, threads=threads), **change)
                with Engine.load(model, weights="dummy", policy=policy.with_percent(*PLACEMENTS[placement]),
                                 device="cpu", offload_dir=tmp) as eng:
                    eng.generate(prompts, max_new_tokens=gen_len, logprobs=False)
                    runs[name].append(batch * (gen_len - 1) / eng.stats.decode_s)
    return runs


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m engine.bench.cache_keys", description=__doc__)
    p.add_argument("--model", default="opt-125m")
    p.add_argument("--placement", choices=tuple(PLACEMENTS), default="resident",
                   help="the KV cache resident in memory, or streamed from the disk tier")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    runs = measure(args.model, args.placement, args.batch, args.prompt_len, args.gen_len, args.repeat, args.threads)
    token = statistics.median(runs["c4 token keys"])
    rows = [[name, statistics.median(r), min(r), max(r), statistics.median(r) / token] for name, r in runs.items()]
    print(f"{args.model} dummy weights, {args.placement} cache, B={args.batch}, prompt {args.prompt_len}, "
          f"{args.gen_len} new tokens, {torch.get_num_threads()} threads, {args.repeat} alternating repeats\n")
    print(markdown_table(["cache", "decode tok/s (median)", "min", "max", "÷ c4 token keys"], rows, floatfmt=".3g"))


if __name__ == "__main__":
    main()
