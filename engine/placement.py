"""How a policy's percentages become concrete places: per weight tensor, per KV head, per element."""

from __future__ import annotations

from engine.policy import TIERS, Policy


def tier_of(fraction_mid: float, split: dict[str, float]) -> str:
    """The tier whose cumulative share covers `fraction_mid` (FlexGen's per-tensor rule)."""
    edge = 0.0
    for tier in TIERS:
        edge += split[tier]
        if fraction_mid < edge:
            return tier
    return "disk"


def place_layer_weights(sizes: dict[str, int], policy: Policy) -> dict[str, str]:
    """Place each weight of one layer whole on a tier, so the layer's bytes follow the percentages."""
    total = sum(sizes.values()) or 1
    split = policy.split("weight")
    placed, cum = {}, 0
    for name, size in sizes.items():
        placed[name] = tier_of((cum + size / 2) / total, split)
        cum += size
    return placed


def split_count(n: int, split: dict[str, float]) -> dict[str, tuple[int, int]]:
    """Split n units (KV heads, elements) into contiguous [start, end) ranges per tier."""
    ranges, start, acc = {}, 0, 0.0
    for tier in TIERS:
        acc += split[tier]
        end = n if tier == "disk" else min(n, round(acc * n))
        if end > start:
            ranges[tier] = (start, end)
        start = max(start, end)
    return ranges
