"""The command lines' shared options: policy flags generated from `Policy`'s fields, and loading an engine.

A policy field is declared once, in engine.policy with its help text; this module turns every field
into a flag (`gpu_batch_size` -> `--gpu-batch-size`, booleans as `--x/--no-x`), so a new field needs
no CLI code. Only what is not a field is written here: FlexGen's six-number `--percent`, the
`--compress` and `--comp-bits/--comp-group` shorthands, and where the tiers are and how large.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from engine.api import Engine
from engine.planner.measure import load_hardware
from engine.planner.search import search_policy
from engine.policy import Policy, parse_size
from engine.weights import resolve

_SHORTHANDS = {"comp_bits": ("comp_weight_bits", "comp_cache_bits"),
               "comp_group": ("comp_weight_group", "comp_cache_group")}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults shown in --help and usage errors in one line, as every user error is."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's example lines as written, and shows every default that says something."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def flag_name(field: dataclasses.Field) -> str:
    return "--" + field.name.replace("_", "-")


def add_policy_args(parser: argparse.ArgumentParser, *, default_block: tuple[int, int] = (8, 1)) -> None:
    """Add the policy options shared by engine.generate, engine.bench, engine.search, harness.run."""
    g = parser.add_argument_group("policy")
    g.add_argument("--policy", choices=["manual", "auto"], default="manual",
                   help="'auto' chooses the placement with the policy search")
    g.add_argument("--hardware", default="local",
                   help="profile for --policy auto: t4-paper, a100-40gb, a100-80gb, h100-80gb, h200, 'local' "
                        "(this machine, measured once) or a profile JSON path")
    g.add_argument("--percent", nargs=6, type=float, metavar=("WG", "WC", "CG", "CC", "HG", "HC"),
                   help="weights, cache and activations on gpu/cpu, in percent; disk takes the rest "
                        "(default: all on the gpu tier)")
    block = {"gpu_batch_size": default_block[0], "num_gpu_batches": default_block[1]}
    for field in dataclasses.fields(Policy):
        meta = field.metadata
        if not meta.get("cli", True):
            continue
        # Unset flags stay None, so Policy's own default applies and a shorthand can tell them apart.
        default = block.get(field.name, field.default)
        shown = "" if default is None else f" (default: {default})"
        names = (flag_name(field), *meta.get("aliases", ()))
        if isinstance(field.default, bool):
            g.add_argument(*names, dest=field.name, action=argparse.BooleanOptionalAction,
                           help=meta["help"] + shown)
        else:
            g.add_argument(*names, dest=field.name, type=meta.get("type", type(field.default)),
                           choices=meta.get("choices"), default=block.get(field.name), help=meta["help"] + shown)
    g.add_argument("--compress", choices=["none", "weight", "cache", "both"],
                   help="shorthand for --compress-weight / --compress-cache")
    g.add_argument("--comp-bits", type=int, help="shorthand: --comp-weight-bits and --comp-cache-bits")
    g.add_argument("--comp-group", type=int, help="shorthand: --comp-weight-group and --comp-cache-group")
    g.add_argument("--gpu-mem", help="budget of the gpu tier, e.g. 16GiB (default: free memory)")
    g.add_argument("--cpu-mem", help="budget of the cpu tier, e.g. 64GiB (default: available RAM)")
    g.add_argument("--offload-dir", help="folder of the disk tier (default: a temporary folder)")


def policy_from_args(args: argparse.Namespace) -> Policy:
    """Build a Policy from parsed policy options (without resolving --policy auto).

    A specific flag (--comp-weight-bits) wins over its shorthand (--comp-bits) when both are given.
    """
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Policy) if f.metadata.get("cli", True)}
    for shorthand, targets in _SHORTHANDS.items():
        for target in targets:
            if values[target] is None:
                values[target] = getattr(args, shorthand, None)
    compress = getattr(args, "compress", None)
    values["compress_weight"] = bool(values["compress_weight"] or compress in ("weight", "both"))
    values["compress_cache"] = bool(values["compress_cache"] or compress in ("cache", "both"))
    policy = Policy(**{name: value for name, value in values.items() if value is not None})
    return policy.with_percent(*args.percent) if args.percent else policy


def resolve_policy(args: argparse.Namespace, *, prompt_len: int, gen_len: int,
                   max_block_size: int | None = None) -> Policy:
    """The policy the options give; with --policy auto, the one the search picks for this workload."""
    policy = policy_from_args(args)
    if getattr(args, "policy", "manual") != "auto":
        return policy
    cfg, _ = resolve(args.model, getattr(args, "weights", None))
    result = search_policy(cfg, load_hardware(args.hardware), prompt_len=prompt_len, gen_len=gen_len,
                           compress_weight=policy.compress_weight, compress_cache=policy.compress_cache,
                           gpu_mem=parse_size(args.gpu_mem), cpu_mem=parse_size(args.cpu_mem),
                           max_block_size=max_block_size, base=policy)
    print(f"policy auto ({args.hardware}): {policy_flags(result.policy)}, "
          f"predicted {result.throughput_tok_s:.2f} tok/s", file=sys.stderr)
    return result.policy


def policy_flags(policy: Policy) -> str:
    """The placement part of a policy as the flags that reproduce it."""
    return (f"--percent {' '.join(f'{v:g}' for v in policy.percent)} --gpu-batch-size {policy.gpu_batch_size} "
            f"--num-gpu-batches {policy.num_gpu_batches}{' --cpu-cache-compute' if policy.cpu_cache_compute else ''}")


def load_engine(args: argparse.Namespace, *, prompt_len: int, gen_len: int,
                max_block_size: int | None = None) -> Engine:
    """Resolve the policy and load the model the args name."""
    policy = resolve_policy(args, prompt_len=prompt_len, gen_len=gen_len, max_block_size=max_block_size)
    return Engine.load(args.model, policy=policy, weights=getattr(args, "weights", None),
                       device=getattr(args, "device", None), offload_dir=args.offload_dir,
                       gpu_mem=parse_size(args.gpu_mem), cpu_mem=parse_size(args.cpu_mem),
                       disk_mem=parse_size(getattr(args, "disk_mem", None)))

