"""Turn the shared CLI options into a loaded Engine (used by every command line of the project)."""

from __future__ import annotations

import argparse

from engine.api import Engine
from engine.policy import parse_size, policy_from_args


def load_engine(args: argparse.Namespace, *, prompt_len: int, gen_len: int) -> Engine:
    """Build the policy (searching it with --policy auto) and load the model the args name."""
    policy = policy_from_args(args)
    if getattr(args, "policy", "manual") == "auto":
        from engine.config import named_config
        from engine.search import auto_policy

        policy = auto_policy(args, policy, prompt_len=prompt_len, gen_len=gen_len, named_config=named_config)
    return Engine.load(args.model, policy=policy, weights=getattr(args, "weights", None),
                       device=getattr(args, "device", None), offload_dir=args.offload_dir,
                       gpu_mem=parse_size(args.gpu_mem), cpu_mem=parse_size(args.cpu_mem))
