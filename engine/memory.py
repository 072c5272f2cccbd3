"""The engine's own estimate of its peak bytes per tier, checked against the budgets up front."""

from __future__ import annotations

import math

from engine.codec import RowCodec, WeightCodec
from engine.config import ModelConfig
from engine.errors import UserError
from engine.placement import split_count
from engine.policy import TIERS, Policy
from engine.tiers import DiskStore, human

_CHECK_HINT = "raise the budget (--gpu-mem/--cpu-mem, a bigger --offload-dir) or move data with --percent"


def zero() -> dict[str, int]:
    return dict.fromkeys(TIERS, 0)


def weight_bytes(placed: list[dict[str, tuple[str, WeightCodec]]]) -> dict[str, int]:
    """Bytes of stored weights per tier."""
    total = zero()
    for layer in placed:
        for tier, codec in layer.values():
            total[tier] += codec.nbytes
    return total


def working_bytes(placed: list[dict[str, tuple[str, WeightCodec]]], compute_elem: int,
                  zero_copy: set[str]) -> dict[str, int]:
    """Two layers of weights in compute form (in use and prefetched) and the disk read staging.

    Weights on a tier in `zero_copy` are used in place and need no working copy.
    """
    def copies(layer) -> int:
        return sum(math.prod(c.shape) * compute_elem for t, c in layer.values() if t not in zero_copy)

    staging = max(sum(DiskStore.staging_bytes(c.nbytes) for t, c in layer.values() if t == "disk")
                  for layer in placed)
    return {"gpu": 2 * max(copies(layer) for layer in placed), "cpu": 2 * staging, "disk": 0}


def block_bytes(cfg: ModelConfig, policy: Policy, batches: list[tuple[int, int]], steps: int,
                storage, compute_elem: int, cache_quant) -> dict[str, int]:
    """KV cache, activations and transient compute buffers of one block of (rows, padded_len) batches."""
    total = zero()
    for rows, length in batches:
        for tier, (h0, h1) in split_count(cfg.kv_heads, policy.split("cache")).items():
            codec = RowCodec(rows * (h1 - h0) * cfg.head_dim, storage, cache_quant, vector=cfg.head_dim)
            total[tier] += 2 * cfg.n_layers * (length + steps) * codec.row_bytes
        for tier, (a, b) in split_count(rows * length * cfg.hidden, policy.split("act")).items():
            total[tier] += (b - a) * compute_elem
    rows, length = max(batches, key=lambda rl: rl[0] * rl[1])
    transient = rows * length * (cfg.ffn + 4 * cfg.hidden) * compute_elem
    transient += rows * cfg.n_heads * length * length * 4 + rows * cfg.vocab_size * 4 * 2
    total["gpu"] += transient
    return total


def check(need: dict[str, int], budgets: dict[str, int], what: str) -> None:
    """Refuse up front, in one line that names the numbers, a plan that exceeds any budget."""
    over = [f"{t} needs {human(need[t])} > budget {human(budgets[t])}" for t in TIERS if need[t] > budgets[t]]
    if over:
        raise UserError(f"{what}: " + "; ".join(over) + f"; {_CHECK_HINT}")
