"""Comparing engine outputs with the HF reference, row by row."""

from __future__ import annotations

from engine.bench.reference import hf_greedy, hf_prompt_logprobs

TOL = 1e-4


_CACHE: dict = {}


def _greedy(model, prompt: list[int], max_new: int):
    key = (id(model), tuple(prompt), max_new)
    if key not in _CACHE:
        _CACHE[key] = hf_greedy(model, prompt, max_new)
    return _CACHE[key]


def assert_matches_hf(eng, model, prompts: list[list[int]], max_new: int, echo: bool = False) -> None:
    outs = eng.generate(prompts, max_new_tokens=max_new, echo_prompt=echo)
    for prompt, out in zip(prompts, outs, strict=True):
        tokens, lps = _greedy(model, prompt, max_new)
        assert out.token_ids == tokens, f"tokens differ for prompt {prompt[:6]}...: {out.token_ids} vs {tokens}"
        assert max(abs(a - b) for a, b in zip(out.logprobs, lps, strict=True)) < TOL
        if echo:
            ref = hf_prompt_logprobs(model, prompt)
            assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
            assert max(abs(a - b) for a, b in zip(out.prompt_logprobs[1:], ref, strict=True)) < TOL
