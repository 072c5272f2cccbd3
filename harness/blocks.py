"""Blocks: the unit of work a replica computes, whether in this process, on a Ray actor or in a shard.

A block is one engine call's worth of one run's requests, planned exactly as the in-process executor
plans them (same generation parameters, length-sorted, `policy.block_size` rows). Keeping the blocks
identical wherever they run is what makes a distributed run's completions equal the in-process ones:
a row's last bits, and a seeded sample, depend on which rows share its engine call.
"""

from __future__ import annotations

from dataclasses import dataclass

from helm.common.request import Request, RequestResult

from harness.batching import GenerationParams, plan_engine_calls
from harness.generation import CallStats, TokenTexts, run_engine_call


@dataclass
class Block:
    """Requests of one run that share one engine call, with their request-cache keys."""

    run: str  # the HELM run spec's name ("" until the runner names it)
    keys: list[str]
    requests: list[Request]
    prompt_ids: list[list[int]]

    @property
    def cost(self) -> int:
        """Positions computed, a proxy for time: rows x (longest prompt + tokens to generate)."""
        longest = max(len(ids) for ids in self.prompt_ids)
        return len(self.requests) * (longest + self.requests[0].max_tokens)


def plan_blocks(keys: list[str], requests: list[Request], texts: TokenTexts, block_size: int) -> list[Block]:
    """Blocks for requests that still need computing, in the executor's order."""
    prompt_ids = [texts.encode_prompt(r.prompt) for r in requests]
    calls = plan_engine_calls([GenerationParams.of(r) for r in requests], [len(p) for p in prompt_ids], block_size)
    return [Block("", [keys[i] for i in call], [requests[i] for i in call], [prompt_ids[i] for i in call])
            for call in calls]


def run_block(engine, texts: TokenTexts, block: Block, seed: int) -> tuple[list[RequestResult], CallStats]:
    """Compute one block on a loaded engine."""
    return run_engine_call(engine, texts, block.requests, seed, block.prompt_ids)


def longest_first(blocks: list[Block]) -> list[Block]:
    """Costliest blocks first, so the last block to finish is a short one (ties keep their order)."""
    return sorted(blocks, key=lambda b: -b.cost)
