"""Bytes a run's KV cache and activations must take on each tier, worked out from the model's shapes.

Independent of the engine's own estimate (engine.memory.block_bytes): only the policy's split rule
(engine.placement.split_count: by KV head for the cache, by element for activations) and the stored
row format (engine.quant.groupwise.row_nbytes) are shared with the code under test.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import ModelConfig
from engine.placement import split_count
from engine.policy import TIERS, Policy
from engine.quant.groupwise import QuantSpec, row_nbytes


def _zero() -> dict[str, int]:
    return dict.fromkeys(TIERS, 0)


def fractions(policy: Policy, kind: str) -> dict[str, float]:
    """The policy's shares of 'cache' or 'act' per tier, read from its percentages (not from Policy.split)."""
    gpu, cpu = getattr(policy, f"{kind}_gpu_percent") / 100, getattr(policy, f"{kind}_cpu_percent") / 100
    return {"gpu": gpu, "cpu": cpu, "disk": max(0.0, 1 - gpu - cpu)}


def blocks(lengths: list[int], policy: Policy) -> list[list[tuple[int, int]]]:
    """Blocks of GPU batches as (rows, padded length): rows sorted by length, gpu_batch_size rows a batch."""
    order, gbs, size = sorted(lengths), policy.gpu_batch_size, policy.block_size
    return [[(len(blk[i:i + gbs]), max(blk[i:i + gbs])) for i in range(0, len(blk), gbs)]
            for blk in (order[b:b + size] for b in range(0, len(order), size))]


def token_head_bytes(cfg: ModelConfig, policy: Policy, storage_elem: int) -> float:
    """Stored bytes of one position's K (or V) for one KV head of one sequence: plain, one quantized vector,
    or for keys grouped per channel, a block's share (group × d codes, a min and step per channel)."""
    if not policy.compress_cache:
        return cfg.head_dim * storage_elem
    spec = QuantSpec(policy.comp_cache_bits, policy.comp_cache_group)
    if _by_channel(policy):
        return _key_block_bytes(cfg, spec) / spec.group
    return row_nbytes(cfg.head_dim, spec)


def _key_block_bytes(cfg: ModelConfig, spec: QuantSpec) -> int:
    """One head's block of channel-grouped keys: group × d codes packed together, an fp16 min and step a channel."""
    return -(-spec.group * cfg.head_dim * spec.bits // 8) + 4 * cfg.head_dim


def _by_channel(policy: Policy) -> bool:
    return policy.compress_cache and policy.comp_cache_keys == "channel"


def _head_bytes(cfg: ModelConfig, policy: Policy, storage_elem: int, length: int, passes: int) -> tuple[int, int]:
    """(held, written) cache bytes of one KV head of one sequence in one layer, K and V, over a prefill of
    `length` positions and passes − 1 decode steps. Channel-grouped keys hold whole blocks and a window of
    group − 1 positions; each position is written once, to its block if that is whole by the end of the pass
    that computed it, else to the window."""
    positions = length + passes
    if not _by_channel(policy):
        token = int(token_head_bytes(cfg, policy, storage_elem))
        return 2 * positions * token, 2 * (positions - 1) * token
    spec = QuantSpec(policy.comp_cache_bits, policy.comp_cache_group)
    group, value = spec.group, row_nbytes(cfg.head_dim, spec)
    block = _key_block_bytes(cfg, spec)
    window = cfg.head_dim * storage_elem
    held = positions * value + positions // group * block + min(group - 1, positions) * window
    ends = [length + i for i in range(passes)]  # positions computed by the end of each pass
    in_window = sum(1 for i, end in enumerate(ends) for p in range(ends[i - 1] if i else 0, end)
                    if p >= end // group * group)
    written = (positions - 1) * value + (positions - 1) // group * block + in_window * window
    return held, written


@dataclass
class Expected:
    """Per tier, beyond what the loaded model holds: the most held at once, and the bytes a run writes.

    The disk peak is a range: activations with any share on disk get a store sized for the whole batch
    (engine.kv_cache.Activation), though only the disk share is written to it. Without a disk share of
    activations the range is one number.
    """

    peak: dict[str, int]
    disk_peak_most: int
    written: dict[str, int]


def expected_bytes(cfg: ModelConfig, policy: Policy, lengths: list[int], passes: int, storage_elem: int,
                   compute_elem: int) -> Expected:
    """What `passes` forward passes (a prefill, then decodes) over prompts of `lengths` store per tier."""
    heads = {t: b - a for t, (a, b) in split_count(cfg.kv_heads, fractions(policy, "cache")).items()}
    split = fractions(policy, "act")
    peak, most, written = _zero(), 0, _zero()
    for block in blocks(lengths, policy):  # one block at a time: each frees its cache before the next
        held, share, store = _zero(), 0, 0
        for rows, length in block:
            head_held, head_written = _head_bytes(cfg, policy, storage_elem, length, passes)
            for t, h in heads.items():
                # K and V of every layer with room for every position; each pass writes its new positions
                held[t] += cfg.n_layers * rows * h * head_held
                written[t] += cfg.n_layers * rows * h * head_written
            # between layers every GPU batch holds its hidden states, the prefill's being the largest
            prefill = rows * length * cfg.hidden
            for t, (a, b) in split_count(prefill, split).items():
                held[t] += (b - a) * compute_elem
                share += (b - a) * compute_elem if t == "disk" else 0
            store += prefill * compute_elem if split["disk"] > 0 else 0
            # each pass stores the embedding's output and every decoder layer's: the prompt, then one token a row
            for n in [prefill] + [rows * cfg.hidden] * (passes - 1):
                a, b = split_count(n, split).get("disk", (0, 0))
                written["disk"] += (1 + cfg.n_layers) * (b - a) * compute_elem
        most = max(most, held["disk"] - share + store)
        peak = {t: max(peak[t], held[t]) for t in TIERS}
    return Expected(peak, max(most, peak["disk"]), written)

