"""Turn a group of HELM requests into one engine call, and engine outputs into HELM results.

Prompts are tokenized here (with the tokenizer's default special tokens, as HELM's own Hugging Face
client does), and completion text is decoded here from the generated token ids, so stop-sequence
truncation and token texts do not depend on how the engine renders text. The engine still gets the
stop sequences, so it stops early; we cut the text at the first stop sequence ourselves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from helm.common.request import GeneratedOutput, Request, RequestResult, Token

from engine import GenerationStats
from harness.batching import GenerationParams

# engine finish reasons -> the names HELM's finish_reason metrics count
FINISH_REASONS = {"eos": "endoftext", "stop": "stop", "length": "length"}
STAT_SUMS = ("prefill_s", "decode_s", "generated_tokens", "prompt_tokens", "padded_prompt_tokens")


@dataclass
class CallStats:
    """Engine figures summed over the engine calls of one run (or one block)."""

    calls: int = 0
    rows: int = 0
    wall_s: float = 0.0
    sums: dict = field(default_factory=lambda: dict.fromkeys(STAT_SUMS, 0.0))
    peak_bytes: dict = field(default_factory=dict)
    bytes_read: dict = field(default_factory=dict)
    bytes_written: dict = field(default_factory=dict)

    def add_engine_stats(self, stats: GenerationStats) -> None:
        for name in STAT_SUMS:
            self.sums[name] += float(getattr(stats, name))
        for name in ("bytes_read", "bytes_written"):
            total = getattr(self, name)
            for tier, value in getattr(stats, name).items():
                total[tier] = total.get(tier, 0) + int(value)
        for tier, value in stats.peak_bytes.items():
            self.peak_bytes[tier] = max(self.peak_bytes.get(tier, 0), int(value))

    def merge(self, other: CallStats) -> None:
        self.calls += other.calls
        self.rows += other.rows
        self.wall_s += other.wall_s
        for name in STAT_SUMS:
            self.sums[name] += other.sums[name]
        for name in ("bytes_read", "bytes_written"):
            total = getattr(self, name)
            for tier, value in getattr(other, name).items():
                total[tier] = total.get(tier, 0) + value
        for tier, value in other.peak_bytes.items():
            self.peak_bytes[tier] = max(self.peak_bytes.get(tier, 0), value)

    def to_dict(self) -> dict:
        s = self.sums
        engine_s = s["prefill_s"] + s["decode_s"]
        return {
            "engine_calls": self.calls, "rows": self.rows,
            "mean_batch_size": self.rows / self.calls if self.calls else None,
            "wall_s": self.wall_s, **{k: (int(v) if k.endswith("tokens") else v) for k, v in s.items()},
            "generated_tokens_per_s": s["generated_tokens"] / engine_s if engine_s else None,
            "padding_efficiency": (s["prompt_tokens"] / s["padded_prompt_tokens"]
                                   if s["padded_prompt_tokens"] else None),
            "peak_bytes": self.peak_bytes, "bytes_read": self.bytes_read, "bytes_written": self.bytes_written,
        }


class TokenTexts:
    """Decodes token ids one at a time (memoized) and whole sequences, without cleanup."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._memo: dict[int, str] = {}

    def one(self, token_id: int) -> str:
        text = self._memo.get(token_id)
        if text is None:
            text = self._memo[token_id] = self.tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
        return text

    def many(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, clean_up_tokenization_spaces=False)

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])


def _cut_at_stop(texts: TokenTexts, ids: list[int], stops: tuple[str, ...]) -> tuple[int, int] | None:
    """(token count, char count) kept before the first stop sequence, or None if no stop occurs."""
    full = texts.many(ids)
    hits = [full.find(s) for s in stops if s and s in full]
    if not hits:
        return None
    cut = min(hits)
    lo, hi = 0, len(ids)  # the longest token prefix whose text fits before the stop
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(texts.many(ids[:mid])) <= cut:
            lo = mid
        else:
            hi = mid - 1
    return lo, cut


def to_completion(texts: TokenTexts, request: Request, prompt_ids: list[int], out,
                  eos_ids: tuple[int, ...]) -> GeneratedOutput:
    """One engine output row as HELM's GeneratedOutput (echoing the prompt when asked)."""
    ids, logprobs = list(out.token_ids), [float(lp) for lp in (out.logprobs or [0.0] * len(out.token_ids))]
    reason = FINISH_REASONS.get(out.finish_reason, "unknown")
    if reason == "endoftext" and ids and ids[-1] in eos_ids:
        ids, logprobs = ids[:-1], logprobs[:-1]
    text = texts.many(ids)
    cut = _cut_at_stop(texts, ids, tuple(request.stop_sequences))
    if cut is not None:
        kept, chars = cut
        ids, logprobs, text, reason = ids[:kept], logprobs[:kept], text[:chars], "stop"
    tokens = [Token(texts.one(t), lp) for t, lp in zip(ids, logprobs, strict=True)]
    if request.echo_prompt:
        prompt_lps = [0.0 if lp is None else float(lp) for lp in out.prompt_logprobs]
        tokens = [Token(texts.one(t), lp) for t, lp in zip(prompt_ids, prompt_lps, strict=True)] + tokens
        text = request.prompt + text
    return GeneratedOutput(text=text, logprob=sum(t.logprob for t in tokens), tokens=tokens,
                           finish_reason={"reason": reason})


def run_engine_call(engine, texts: TokenTexts, requests: list[Request], seed: int,
                    prompt_ids: list[list[int]] | None = None) -> tuple[list[RequestResult], CallStats]:
    """Generate for requests that share GenerationParams; one engine call per distinct completion.

    With temperature 0 every completion is the same, so one call serves `num_completions`;
    otherwise completion i is sampled with seed `seed + i`.
    """
    params = GenerationParams.of(requests[0])
    if any(GenerationParams.of(r) != params for r in requests):
        raise ValueError("requests of one engine call must share their generation parameters")
    if prompt_ids is None:
        prompt_ids = [texts.encode_prompt(r.prompt) for r in requests]
    n = max(1, params.num_completions)
    distinct = 1 if params.temperature == 0 or params.max_tokens == 0 else n
    stats = CallStats(calls=distinct, rows=len(requests) * distinct)
    started, wall = time.perf_counter(), time.time()
    runs = []
    for i in range(distinct):
        runs.append(engine.generate(
            prompt_ids, max_new_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
            stop=list(params.stop_sequences) or None, seed=seed + i, logprobs=True,
            echo_prompt=params.echo_prompt))
        stats.add_engine_stats(engine.stats)
    stats.wall_s = elapsed = time.perf_counter() - started
    eos_ids = tuple(engine.config.eos_token_id or ())
    results = []
    for row, request in enumerate(requests):
        completions = [to_completion(texts, request, prompt_ids[row], runs[min(i, distinct - 1)][row], eos_ids)
                       for i in range(n)]
        results.append(RequestResult(
            success=True, embedding=[], completions=completions, cached=False, request_time=elapsed,
            request_datetime=int(wall), batch_size=len(requests), batch_request_time=elapsed))
    return results, stats
