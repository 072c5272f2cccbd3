"""Turn the shared CLI options into a policy and a loaded Engine (used by every command line)."""

from __future__ import annotations

import argparse
import sys

from engine.api import Engine
from engine.policy import Policy, parse_size, policy_from_args


def resolve_policy(args: argparse.Namespace, *, prompt_len: int, gen_len: int,
                   max_block_size: int | None = None) -> Policy:
    """The policy the options give; with --policy auto, the one the search picks for this workload."""
    policy = policy_from_args(args)
    if getattr(args, "policy", "manual") != "auto":
        return policy
    from engine.checkpoint import resolve
    from engine.hardware import load_hardware
    from engine.search import search_policy

    cfg, _ = resolve(args.model, getattr(args, "weights", None))
    result = search_policy(cfg, load_hardware(args.hardware), prompt_len=prompt_len, gen_len=gen_len,
                           compress_weight=policy.compress_weight, compress_cache=policy.compress_cache,
                           gpu_mem=parse_size(args.gpu_mem), cpu_mem=parse_size(args.cpu_mem),
                           max_block_size=max_block_size, base=policy)
    p = result.policy
    print(f"policy auto ({args.hardware}): --percent {' '.join(f'{v:g}' for v in p.percent)} "
          f"--gpu-batch-size {p.gpu_batch_size} --num-gpu-batches {p.num_gpu_batches}"
          f"{' --cpu-cache-compute' if p.cpu_cache_compute else ''}, predicted {result.throughput_tok_s:.2f} tok/s",
          file=sys.stderr)
    return p


def load_engine(args: argparse.Namespace, *, prompt_len: int, gen_len: int,
                max_block_size: int | None = None) -> Engine:
    """Resolve the policy and load the model the args name."""
    policy = resolve_policy(args, prompt_len=prompt_len, gen_len=gen_len, max_block_size=max_block_size)
    return Engine.load(args.model, policy=policy, weights=getattr(args, "weights", None),
                       device=getattr(args, "device", None), offload_dir=args.offload_dir,
                       gpu_mem=parse_size(args.gpu_mem), cpu_mem=parse_size(args.cpu_mem))
