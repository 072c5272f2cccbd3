"""Choosing the next token: greedy, or temperature/top-k/top-p sampling seeded per row, on the compute device.

Everything stays on the device the scores are on, so a decode step reads its tokens back once, after
choosing (engine.api), rather than the host waiting on the device to choose.
"""

from __future__ import annotations

import torch


def row_generator(seed: int, row: int, device: torch.device) -> torch.Generator:
    """A row's own generator on the compute device, so its samples do not depend on what else shares the batch."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + row)


def choose(logprobs: torch.Tensor, temperature: float, top_p: float, top_k: int,
           generators: list[torch.Generator]) -> torch.Tensor:
    """Next token per row from log-softmax scores (b, V); returns (b,) long on their device."""
    if temperature <= 0:
        return logprobs.argmax(-1)
    scores = logprobs.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix reaching top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = scores.softmax(-1)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators, strict=True)])


def find_stop(text: str, stops: list[str]) -> int | None:
    """Index where the earliest stop string starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
