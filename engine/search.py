"""`python -m engine.search`: the policy search and the cost model from the command line.

    python -m engine.search --model opt-30b --hardware t4-paper --prompt-len 512 --gen-len 32
    python -m engine.search --model opt-30b --hardware t4-paper --evaluate-policy --percent 20 80 0 100 0 100 \
        --gpu-batch-size 48 --num-gpu-batches 3 --cpu-cache-compute
    python -m engine.search --paper-table
    python -m engine.search --validate-local
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engine.bench import cost_validation
from engine.config import ModelConfig, load_folder_config, named_config
from engine.errors import UserError, cli_main
from engine.flags import ArgumentParser, add_policy_args, policy_flags, policy_from_args
from engine.planner.cost_model import Prediction, predict
from engine.planner.hardware import HardwareProfile
from engine.planner.measure import load_hardware
from engine.planner.search import capacities, search_policy
from engine.policy import TIERS, Policy, parse_size


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _report(cfg: ModelConfig, hw: HardwareProfile, policy: Policy, pred: Prediction, capacity: dict[str, int],
            title: str) -> str:
    lines = [f"{title}: {cfg.name} on {hw.name}",
             f"  policy: {policy.label()}   ({policy_flags(policy)})",
             f"  predicted throughput: {pred.throughput_tok_s:.3f} tok/s "
             f"(prefill {pred.prefill_s:.2f} s, decode {pred.decode_s:.2f} s)",
             "  peak memory:"]
    lines += [f"    {t:4s} {_gib(pred.peak_bytes[t]):>12s} of {_gib(capacity[t])}" for t in TIERS]
    return "\n".join(lines)


def _checks(args: argparse.Namespace) -> None:
    if args.paper_table:
        hw = load_hardware("t4-paper" if args.hardware == "local" else args.hardware)
        print(cost_validation.markdown(cost_validation.paper_table(hw)))
        return
    hw = load_hardware(args.hardware)
    rows, summary = cost_validation.validate_local(hw, args.model or "opt-1.3b",
                                          args.num_prompts, args.prompt_len, args.gen_len, args.offload_dir,
                                          remeasure=args.reprofile)
    print(cost_validation.markdown(rows))
    print(f"median |error| {summary['median_abs_rel_error']:.1%}; searched policy measures "
          f"{summary['searched_over_best_hand']:.0%} of the best hand policy ({summary['best_hand']})")


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m engine.search", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="named config (e.g. opt-30b) or a HF checkpoint folder; "
                                         "--validate-local defaults to opt-1.3b")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--disk-mem", help="budget of the disk tier, e.g. 1.5TB")
    parser.add_argument("--max-block-size", type=int, help="cap on gpu_batch_size x num_gpu_batches")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--evaluate-policy", action="store_true",
                        help="predict the policy given by the policy options instead of searching")
    parser.add_argument("--paper-table", action="store_true",
                        help="predict FlexGen's published policies on t4-paper and search their setups")
    parser.add_argument("--validate-local", action="store_true",
                        help="run OPT-1.3B dummy policies on this machine: predicted vs measured "
                             "(e.g. --num-prompts 8 --prompt-len 16 --gen-len 8)")
    parser.add_argument("--num-prompts", type=int, default=8, help="prompts per --validate-local run")
    parser.add_argument("--reprofile", action="store_true",
                        help="with --validate-local: re-measure this machine before each run")
    add_policy_args(parser)
    args = parser.parse_args(argv)
    if args.paper_table or args.validate_local:
        _checks(args)
        return
    if args.prompt_len < 1 or args.gen_len < 1:
        raise UserError("--prompt-len and --gen-len must be positive")
    if not args.model:
        raise UserError("--model is required: a named config such as opt-30b, or a HF checkpoint folder")
    cfg = load_folder_config(Path(args.model)) if Path(args.model).is_dir() else named_config(args.model)
    hw = load_hardware(args.hardware)
    capacity = capacities(hw, parse_size(args.gpu_mem), parse_size(args.cpu_mem), parse_size(args.disk_mem))
    if args.evaluate_policy:
        policy = policy_from_args(args)
        pred = predict(cfg, hw, policy, args.prompt_len, args.gen_len)
        title = "policy"
    else:
        base = policy_from_args(args)
        result = search_policy(cfg, hw, prompt_len=args.prompt_len, gen_len=args.gen_len,
                               compress_weight=base.compress_weight, compress_cache=base.compress_cache,
                               gpu_mem=capacity["gpu"], cpu_mem=capacity["cpu"], disk_mem=capacity["disk"],
                               max_block_size=args.max_block_size, base=base)
        policy, pred, title = result.policy, result.prediction, "searched policy"
    if args.json:
        print(json.dumps({"policy": policy.to_dict(), "throughput_tok_s": pred.throughput_tok_s,
                          "peak_bytes": pred.peak_bytes}))
    else:
        print(_report(cfg, hw, policy, pred, capacity, title))


if __name__ == "__main__":
    cli_main(main)()
