"""Choosing the next token: greedy, or temperature/top-k/top-p sampling seeded per row."""

from __future__ import annotations

import torch


def row_generator(seed: int, row: int) -> torch.Generator:
    """A row's own generator, so its samples do not depend on what else shares the batch."""
    return torch.Generator().manual_seed(seed * 1_000_003 + row)


def choose(logprobs: torch.Tensor, temperature: float, top_p: float, top_k: int,
           generators: list[torch.Generator]) -> torch.Tensor:
    """Next token per row from log-softmax scores (b, V); returns (b,) long on the CPU."""
    if temperature <= 0:
        return logprobs.argmax(-1).cpu()
    scores = logprobs.float().cpu() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum - sorted_scores.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = scores.softmax(-1)
    return torch.stack([torch.multinomial(p, 1, generator=g)[0] for p, g in zip(probs, generators, strict=True)])


def find_stop(text: str, stops: list[str]) -> int | None:
    """Index where the earliest stop string starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
