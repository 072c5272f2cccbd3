"""Policy search: enumerate block shapes, solve the placement fractions as a linear program.

For a fixed gpu_batch_size x num_gpu_batches and cpu_cache_compute, the cost model's time is a
convex piecewise-linear function of the nine placement fractions and its peak memory per tier is
linear, so scipy's HiGHS solves the placement exactly. The best block over the enumeration wins.

    python -m engine.search --model opt-30b --hardware t4-paper --prompt-len 512 --gen-len 32
    python -m engine.search --model opt-30b --hardware t4-paper --evaluate-policy --percent 20 80 0 100 0 100 \
        --gpu-batch-size 48 --num-gpu-batches 3 --cpu-cache-compute
    python -m engine.search --paper-table
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import linprog

from engine.config import ModelConfig, load_folder_config, named_config
from engine.cost_model import (
    FRACTIONS,
    Expr,
    Lin,
    Max,
    Prediction,
    Scale,
    Sum,
    memory_model,
    model_sizes,
    predict,
    time_model,
)
from engine.errors import UserError, cli_main
from engine.hardware import HardwareProfile, load_hardware
from engine.policy import TIERS, Policy, add_policy_args, parse_size, policy_from_args

GPU_BATCH_SIZES = (1, 2, 4, 8, 12, 16, 20, 24, 32, 36, 48, 64, 72, 96, 128, 192, 256)
NUM_GPU_BATCHES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# Capacity kept free on every tier. FlexGen ran its OPT-30B policy with the T4 nearly full; this
# cost model puts that policy at 96% of 16 GiB, so a larger margin would rule out the paper's policy.
MEMORY_MARGIN = 0.03
_TIE_BREAK = 1e-4  # seconds per unit fraction one tier further from the device


@dataclass(frozen=True)
class SearchResult:
    policy: Policy
    throughput_tok_s: float
    peak_bytes: dict[str, int]
    prediction: Prediction
    capacity: dict[str, int]


# -- the linear program ---------------------------------------------------------------------------

class _Program:
    """Collects `Lin <= 0` rows; each Max becomes an auxiliary variable bounded below by its parts."""

    def __init__(self) -> None:
        self.n_vars = len(FRACTIONS)
        self.rows: list[Lin] = []

    def linearize(self, expr: Expr) -> Lin:
        if isinstance(expr, Lin):
            return expr
        if isinstance(expr, Scale):
            return self.linearize(expr.expr) * expr.times
        if isinstance(expr, Sum):
            total = Lin()
            for part in expr.parts:
                total = total + self.linearize(part)
            return total
        assert isinstance(expr, Max)
        z = Lin(0.0, {self.n_vars: 1.0})
        self.n_vars += 1
        for part in expr.parts:
            self.rows.append(self.linearize(part) + z * -1.0)
        return z

    def solve(self, objective: Lin) -> tuple[list[float], float] | None:
        """Fractions and objective value at the optimum, or None when infeasible."""
        def dense(lin: Lin) -> np.ndarray:
            v = np.zeros(self.n_vars)
            for i, c in lin.coef.items():
                v[i] = c
            return v

        a_ub = np.array([dense(r) for r in self.rows])
        b_ub = np.array([-r.const for r in self.rows])
        scale = np.maximum(np.abs(a_ub).max(axis=1), np.abs(b_ub))  # bytes and seconds differ by 1e12
        scale[scale == 0] = 1.0
        a_ub, b_ub = a_ub / scale[:, None], b_ub / scale
        a_eq = np.zeros((3, self.n_vars))
        for k in range(3):
            a_eq[k, 3 * k:3 * k + 3] = 1.0
        bounds = [(0.0, 1.0)] * len(FRACTIONS) + [(0.0, None)] * (self.n_vars - len(FRACTIONS))
        # ties (a share that costs nothing where it is) go to the faster tier
        tie_break = dense(Lin(0.0, {i: _TIE_BREAK * (i % 3) for i in range(len(FRACTIONS))}))
        res = linprog(dense(objective) + tie_break, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=np.ones(3),
                      bounds=bounds, method="highs")
        return (list(res.x[:len(FRACTIONS)]), objective.value(list(res.x))) if res.status == 0 else None


def capacities(hw: HardwareProfile, gpu_mem: int | None = None, cpu_mem: int | None = None,
               disk_mem: int | None = None) -> dict[str, int]:
    return {"gpu": gpu_mem if gpu_mem is not None else hw.gpu_mem,
            "cpu": cpu_mem if cpu_mem is not None else hw.cpu_mem,
            "disk": disk_mem if disk_mem is not None else hw.disk_mem}


def _solve_block(cfg: ModelConfig, hw: HardwareProfile, policy: Policy, prompt_len: int, gen_len: int,
                 capacity: dict[str, int], margin: float) -> tuple[Policy, float] | None:
    """The best placement for this block shape and its predicted time, or None when nothing fits."""
    program = _Program()
    objective = program.linearize(time_model(cfg, hw, policy, prompt_len, gen_len).total)
    tiers = memory_model(cfg, policy, prompt_len, gen_len, hw.device)
    usable = {t: capacity[t] * (1 - margin) for t in TIERS}
    for tier in TIERS:
        program.rows += [e + (-usable[tier]) for e in tiers[tier]]
    if hw.shared_host_memory:  # the "gpu" tier is host memory as well
        program.rows += [g + c + (-usable["cpu"]) for g, c in zip(tiers["gpu"], tiers["cpu"], strict=True)]
    solved = program.solve(objective)
    if solved is None:
        return None
    x, seconds = solved
    # percentages rounded down to 0.1%: what is shaved off a tier moves to disk, never onto a full tier
    pct = [math.floor(x[i] * 1000 + 1e-6) / 10 for i in (0, 1, 3, 4, 6, 7)]
    return policy.with_percent(*pct), seconds


def search_policy(cfg: ModelConfig, hardware: HardwareProfile, *, prompt_len: int, gen_len: int,
                  compress_weight: bool = False, compress_cache: bool = False, gpu_mem: int | None = None,
                  cpu_mem: int | None = None, disk_mem: int | None = None, max_block_size: int | None = None,
                  margin: float = MEMORY_MARGIN, base: Policy | None = None) -> SearchResult:
    """The fastest predicted policy that fits every tier (with `margin` kept free).

    `base` carries the fields the search does not choose (dtypes, compression bits, threads, ...).
    `max_block_size` caps gpu_batch_size x num_gpu_batches, e.g. at the number of prompts to run.
    """
    capacity = capacities(hardware, gpu_mem, cpu_mem, disk_mem)
    base = dataclasses.replace(base or Policy(), compress_weight=compress_weight, compress_cache=compress_cache)
    best: tuple[float, Policy] | None = None
    for cpu_cache_compute in (False, True):
        for gbs in GPU_BATCH_SIZES:
            previous = 0.0
            for ngb in NUM_GPU_BATCHES:
                if max_block_size is not None and gbs * ngb > max_block_size:
                    break
                trial = dataclasses.replace(base, gpu_batch_size=gbs, num_gpu_batches=ngb,
                                            cpu_cache_compute=cpu_cache_compute)
                solved = _solve_block(cfg, hardware, trial, prompt_len, gen_len, capacity, margin)
                if solved is None:  # a larger block only needs more memory
                    break
                policy, seconds = solved
                throughput = gbs * ngb / seconds
                if best is None or throughput > best[0]:
                    best = (throughput, policy)
                if throughput < previous:  # past the peak over num_gpu_batches (FlexGen's rule)
                    break
                previous = throughput
            if previous == 0.0 and solved is None:  # not one GPU batch of this size fits: no larger one will
                break
    if best is None:
        raise UserError(_shortfall(cfg, hardware, base, prompt_len, gen_len, capacity, margin))
    pred = predict(cfg, hardware, best[1], prompt_len, gen_len)
    return SearchResult(best[1], pred.throughput_tok_s, pred.peak_bytes, pred, capacity)


def _shortfall(cfg: ModelConfig, hw: HardwareProfile, base: Policy, prompt_len: int, gen_len: int,
               capacity: dict[str, int], margin: float) -> str:
    """Why nothing fits, in bytes: all tiers together, else the device's working set."""
    one_row = dataclasses.replace(base, gpu_batch_size=1, num_gpu_batches=1)
    layer, extra = model_sizes(cfg, one_row, hw.device)
    weights = cfg.n_layers * layer.weight_bytes + extra.weight_bytes
    cache = cfg.n_layers * (prompt_len + gen_len) * layer.kv_bytes
    tiers = ("cpu", "disk") if hw.shared_host_memory else TIERS
    usable = sum(capacity[t] for t in tiers) * (1 - margin)
    need = weights + cache
    if need > usable:
        return (f"{cfg.name or 'model'} does not fit: weights ({weights / 2**30:.1f} GiB) and the KV cache of one "
                f"sequence ({cache / 2**30:.2f} GiB) need {int(need)} bytes, but {' + '.join(tiers)} offer "
                f"{int(usable)} after the {margin:.0%} margin: short by {int(need - usable)} bytes; add disk "
                "(--disk-mem), compress (--compress-weight/--compress-cache) or pick a smaller model")
    offloaded = one_row.with_percent(0, 100, 0, 100, 0, 100)
    device = max(e.value([0, 1, 0, 0, 1, 0, 0, 1, 0])
                 for e in memory_model(cfg, offloaded, prompt_len, gen_len, hw.device)["gpu"])
    short = int(device - capacity["gpu"] * (1 - margin))
    return (f"{cfg.name or 'model'}: even one sequence with everything offloaded needs {int(device)} bytes of "
            f"device working memory, short by {max(short, 0)} bytes of the gpu tier "
            f"({capacity['gpu']} bytes less the {margin:.0%} margin); raise --gpu-mem or shorten the prompt")


# -- CLI ------------------------------------------------------------------------------------------

def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _report(cfg: ModelConfig, hw: HardwareProfile, policy: Policy, pred: Prediction, capacity: dict[str, int],
            title: str) -> str:
    lines = [f"{title}: {cfg.name} on {hw.name}",
             f"  percent (wg wc cg cc hg hc): {' '.join(f'{v:g}' for v in policy.percent)}",
             f"  gpu batch: {policy.gpu_batch_size} x {policy.num_gpu_batches} = {policy.block_size} rows",
             f"  cpu_cache_compute: {policy.cpu_cache_compute}   compression: {policy.compression_label()}",
             f"  predicted throughput: {pred.throughput_tok_s:.3f} tok/s "
             f"(prefill {pred.prefill_s:.2f} s, decode {pred.decode_s:.2f} s)",
             "  peak memory:"]
    lines += [f"    {t:4s} {_gib(pred.peak_bytes[t]):>12s} of {_gib(capacity[t])}" for t in TIERS]
    return "\n".join(lines)


def _checks(args: argparse.Namespace) -> None:
    from engine import search_validation as checks

    if args.paper_table:
        hw = load_hardware("t4-paper" if args.hardware == "local" else args.hardware)
        print(checks.markdown(checks.paper_table(hw)))
        return
    hw = load_hardware(args.hardware)
    rows, summary = checks.validate_local(hw, args.model or "opt-1.3b",
                                          args.num_prompts, args.prompt_len, args.gen_len, args.offload_dir,
                                          remeasure=args.reprofile)
    print(checks.markdown(rows))
    print(f"median |error| {summary['median_abs_rel_error']:.1%}; searched policy measures "
          f"{summary['searched_over_best_hand']:.0%} of the best hand policy ({summary['best_hand']})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.search", description=__doc__.split("\n")[0])
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
