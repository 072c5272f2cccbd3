"""What `Engine.generate` returns: the answers, and the figures of the call that produced them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from engine.policy import TIERS


@dataclass
class Generation:
    """One answer: generated tokens with their true log-probs; `text` leaves out a final EOS."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop", "length" or "eos"
    prompt_logprobs: list[float | None] | None = None
    # the most likely token at each prompt position (None at the first), when asked: lm-eval's is_greedy
    prompt_top1: list[int | None] | None = None


def _per_tier() -> dict[str, int]:
    return dict.fromkeys(TIERS, 0)


@dataclass
class GenerationStats:
    """Figures of one `Engine.generate` call, for throughput tables and memory checks.

    Throughput counts generated tokens over prefill + decode time, as FlexGen's paper does; load
    time is not part of it. Bytes are per tier ("gpu", "cpu", "disk"): `peak_bytes` is the most the
    tier held at once (weights, KV cache, activations, buffers), and `bytes_read` / `bytes_written`
    count the traffic to and from that tier during the call (the gpu tier's own reads are not
    traffic and count 0).
    """

    prefill_s: float = 0.0  # the first forward pass of every block
    decode_s: float = 0.0  # every later pass
    generated_tokens: int = 0
    prompt_tokens: int = 0  # the prompts' own tokens
    padded_prompt_tokens: int = 0  # prompt positions computed, pads included: blocks pad to their longest row
    num_blocks: int = 0
    block_size: int = 0  # rows per block: gpu_batch_size x num_gpu_batches
    peak_bytes: dict[str, int] = field(default_factory=_per_tier)
    bytes_read: dict[str, int] = field(default_factory=_per_tier)
    bytes_written: dict[str, int] = field(default_factory=_per_tier)

    @property
    def elapsed_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def padding_fraction(self) -> float:
        """Share of computed prompt positions that were pads."""
        return 1 - self.prompt_tokens / self.padded_prompt_tokens if self.padded_prompt_tokens else 0.0

    def to_dict(self) -> dict:
        """Plain data for JSON files, with the derived figures included."""
        return {**dataclasses.asdict(self), "tokens_per_s": self.tokens_per_s}
