"""Policy search: enumerate block shapes, solve the placement fractions as a linear program.

For a fixed gpu_batch_size x num_gpu_batches and cpu_cache_compute, the cost model's time is a
convex piecewise-linear function of the nine placement fractions and its peak memory per tier is
linear, so scipy's HiGHS solves the placement exactly. The best block over the enumeration wins.

"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linprog

from engine import memory
from engine.config import ModelConfig
from engine.errors import UserError
from engine.planner.cost_model import (
    FRACTIONS,
    Expr,
    Lin,
    Max,
    Prediction,
    Scale,
    Sum,
    evaluate,
    layout,
    memory_model,
    model_sizes,
    plan_device,
    policy_fractions,
    predict,
    time_model,
)
from engine.planner.hardware import HardwareProfile
from engine.policy import TIERS, Policy

GPU_BATCH_SIZES = (1, 2, 4, 8, 12, 16, 20, 24, 32, 36, 48, 64, 72, 96, 128, 192, 256)
NUM_GPU_BATCHES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# Capacity kept free on every tier. None by default: every answer is checked against the engine's own
# plan (engine.memory), which counts transients and the allocators' slack already, and FlexGen's OPT-175B
# policy with 4-bit compression, which ran on a 16 GB T4, needs all but 0.4% of it in that plan.
MEMORY_MARGIN = 0.0
_TIE_BREAK = 1e-4  # seconds per unit fraction one tier further from the device
_RESOLVES = 4  # linear programs per block shape, each with the tiers the engine's plan found over shrunk


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

    def solve(self, objective: Lin, fixed: dict[int, float] | None = None) -> tuple[list[float], float] | None:
        """Fractions and objective value at the optimum, or None when infeasible; `fixed` pins fractions."""
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
        for i, value in (fixed or {}).items():
            bounds[i] = (value, value)
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
    """The best placement for this block shape that the engine's own plan accepts, and its predicted time
    at the fractions the engine realises; None when nothing fits.

    The linear program sees the engine's estimate only as linear expressions (cost_model.memory_model), and
    the engine places whole tensors and KV heads, so the fractions it realises differ from the program's:
    weights stay within each tier's share (engine.placement). So each answer is checked against the
    engine's plan, and a tier found over is shrunk by the excess and the program solved again. Once an
    answer fits, the program is solved once more with the weights pinned where the engine puts them, so
    that the cache and activations take the room the weights' rounding left; the faster of the two wins.
    """
    usable = {t: capacity[t] * (1 - margin) for t in TIERS}
    time = time_model(cfg, hw, policy, prompt_len, gen_len).total
    model = memory_model(cfg, policy, prompt_len, gen_len, hw.device)
    best: tuple[Policy, float] | None = None
    weights: Policy | None = None  # once an answer fits: its weight percentages, pinned at what they realise
    for _ in range(_RESOLVES):
        program = _Program()
        objective = program.linearize(time)
        for tier in TIERS:
            program.rows += [e + (-usable[tier]) for e in model[tier]]
        if hw.shared_host_memory:  # the "gpu" tier is host memory as well
            program.rows += [e + (-usable["cpu"]) for e in model["host"]]
        pinned = None if weights is None else dict(enumerate(policy_fractions(weights, cfg, hw.device)[:3]))
        solved = program.solve(objective, pinned)
        if solved is None:
            break
        # percentages rounded down to 0.1%: what is shaved off a tier moves to disk, never onto a full tier
        pct = [math.floor(solved[0][i] * 1000 + 1e-6) / 10 for i in (0, 1, 3, 4, 6, 7)]
        found = policy.with_percent(*(pct if weights is None else [*weights.percent[:2], *pct[2:]]))
        excess = _engine_excess(cfg, hw, found, prompt_len, gen_len, usable)
        if excess:
            for tier, over in excess.items():
                usable[tier] -= over
            continue
        seconds = evaluate(time, policy_fractions(found, cfg, hw.device))
        if best is None or seconds < best[1]:
            best = (found, seconds)
        if weights is not None:
            break
        weights = found
    return best


def _engine_excess(cfg: ModelConfig, hw: HardwareProfile, policy: Policy, prompt_len: int, gen_len: int,
                   usable: dict[str, float]) -> dict[str, float]:
    """Bytes by which the engine's plan of `policy` (engine.memory.plan) exceeds each usable tier."""
    plan = memory.plan(cfg, policy, plan_device(hw.device), {t: int(usable[t]) for t in TIERS}, None,
                       prompt_len=prompt_len, gen_len=gen_len, rows=policy.block_size,
                       lay=layout(cfg, policy, hw.device))
    excess = {t: plan.peak[t] - usable[t] for t in TIERS if plan.peak[t] > usable[t]}
    if hw.shared_host_memory and plan.host_peak > usable["cpu"]:
        excess["cpu"] = max(excess.get("cpu", 0.0), plan.host_peak - usable["cpu"])
    return excess


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
