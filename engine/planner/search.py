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
    memory_model,
    model_sizes,
    predict,
    time_model,
)
from engine.planner.hardware import HardwareProfile
from engine.policy import TIERS, Policy

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
