"""How a policy's percentages become concrete places: per weight tensor, per KV head, per element."""

from __future__ import annotations

import bisect
import functools

from engine.policy import TIERS, Policy

_ROUNDING = 1e-9  # of a layer's bytes: a share that is whole in percent must not lose a tensor to float error


def place_layer_weights(sizes: dict[str, int], policy: Policy) -> dict[str, str]:
    """Place each weight of one layer whole on a tier: the faster tiers get as much of their share as whole
    tensors allow, and never more.

    The gpu tier takes the largest set of tensors whose bytes stay within its share of the layer; then
    the gpu and cpu tiers together take the largest set within their combined share (so what the gpu
    could not use of its share goes to the cpu, not to the disk); the disk takes the rest. A tier's
    budget, which the cost model sizes from the shares, therefore holds whatever the tensor sizes.

    FlexGen 0.1.8 (`init_weight_list`) places each tensor by the midpoint of its bytes within its
    attention or MLP sub-layer, counting the tiers from the slowest: disk, cpu, gpu. That can give a tier
    more than its share. With wg=20 it keeps the same set on the GPU as this rule, the output projection
    and the small vectors (8% of an OPT layer). With wg=30 it keeps the output projection and fc2 there
    (42%), while this rule keeps q/k/v (25%). The old rule here went the other way round, counting the
    tiers from the fastest, and so put q/k/v (25%) on the GPU for wg=20.
    """
    names = list(sizes)
    split, total = policy.split("weight"), sum(sizes.values())
    placed, held, share = {}, 0, 0.0
    for tier in ("gpu", "cpu"):
        share += split[tier]
        left = [n for n in names if n not in placed]
        room = share * total * (1 + _ROUNDING) - held
        sums = _subset_sums(tuple(sizes[n] for n in left))
        nbytes, chosen = sums[bisect.bisect_right(sums, (room, 1 << len(left))) - 1]
        for i, name in enumerate(left):
            if chosen >> i & 1:
                placed[name] = tier
        held += nbytes
    return {n: placed.get(n, "disk") for n in names}


@functools.lru_cache(maxsize=64)
def _subset_sums(sizes: tuple[int, ...]) -> list[tuple[int, int]]:
    """(bytes, bitmask) of every distinct subset sum of `sizes`, ascending; the first subset found for each.

    A layer has a dozen tensors at most, so the subsets are few enough to list; layers of one model
    share their sizes, so each list is made once.
    """
    sums = {0: 0}
    for i, size in enumerate(sizes):
        for total, mask in list(sums.items()):
            sums.setdefault(total + size, mask | 1 << i)
    return sorted(sums.items())


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
