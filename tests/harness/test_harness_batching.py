"""The executor's engine calls on dummy weights: batching changes nothing but speed, and each
HELM request shape (n completions, echo with max_tokens=0, multi-token stops) comes back right."""

from __future__ import annotations

import pytest
from helm.common.request import Request

from engine import Engine, Policy
from harness.generation import TokenTexts, run_engine_call

PROMPTS = ["Hi", "The quick brown fox jumps over the lazy dog and keeps running", "1 2 3 4 5",
           "Once upon a time, in a land far away, there lived", "Question: what is 2+2?\nAnswer:"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory, smollm2):
    """Seeded dummy weights for a 2-layer LLaMA config with SmolLM2's vocabulary (and borrowed tokenizer)."""
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("tiny-config")
    LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(folder)
    eng = Engine.load(str(folder), weights="dummy", policy=Policy(gpu_batch_size=2, num_gpu_batches=2))
    yield eng
    eng.close()


def _requests(**kw) -> list[Request]:
    return [Request(model="flexhelm/x", model_deployment="flexhelm/x", prompt=p, **kw) for p in PROMPTS]


def test_a_batched_call_answers_like_one_call_per_request(engine):
    texts = TokenTexts(engine.tokenizer)
    reqs = _requests(temperature=0.0, max_tokens=6)
    batched, stats = run_engine_call(engine, texts, reqs, seed=0)
    assert stats.calls == 1 and stats.rows == len(reqs)
    assert {r.batch_size for r in batched} == {len(reqs)}
    assert len({r.batch_request_time for r in batched}) == 1
    for req, res in zip(reqs, batched, strict=True):
        (alone,), _ = run_engine_call(engine, texts, [req], seed=0)
        assert alone.batch_size == 1
        got, want = res.completions[0], alone.completions[0]
        assert got.text == want.text
        assert [t.logprob for t in got.tokens] == pytest.approx([t.logprob for t in want.tokens], abs=1e-4)


def test_num_completions_sample_with_distinct_seeds_and_greedy_runs_once(engine):
    texts = TokenTexts(engine.tokenizer)
    sampled, stats = run_engine_call(engine, texts, _requests(temperature=1.0, max_tokens=4, num_completions=3),
                                     seed=0)
    assert stats.calls == 3
    assert all(len(r.completions) == 3 for r in sampled)
    assert any(len({c.text for c in r.completions}) > 1 for r in sampled)
    greedy, stats = run_engine_call(engine, texts, _requests(temperature=0.0, max_tokens=4, num_completions=2),
                                    seed=0)
    assert stats.calls == 1
    assert all(r.completions[0] == r.completions[1] for r in greedy)


def test_echo_with_zero_max_tokens_scores_the_prompt(engine):
    texts = TokenTexts(engine.tokenizer)
    results, stats = run_engine_call(engine, texts, _requests(max_tokens=0, echo_prompt=True), seed=0)
    assert stats.sums["generated_tokens"] == 0
    for prompt, res in zip(PROMPTS, results, strict=True):
        c = res.completions[0]
        assert c.text == prompt
        assert len(c.tokens) == len(texts.encode_prompt(prompt))
        assert c.tokens[0].logprob == 0.0 and all(t.logprob < 0 for t in c.tokens[1:])


def test_multi_token_stop_sequence_ends_the_text(engine):
    texts = TokenTexts(engine.tokenizer)
    free, _ = run_engine_call(engine, texts, _requests(temperature=0.0, max_tokens=12), seed=0)
    # a stop string spanning two generated tokens of the longest answer
    longest = max((r.completions[0] for r in free), key=lambda c: len(c.tokens))
    k = len(longest.tokens) // 2
    stop = longest.tokens[k].text + longest.tokens[k + 1].text
    stopped, _ = run_engine_call(engine, texts, _requests(temperature=0.0, max_tokens=12, stop_sequences=[stop]),
                                 seed=0)
    cut = 0
    for before, after in zip(free, stopped, strict=True):
        full = before.completions[0].text
        if stop in full:
            cut += 1
            assert after.completions[0].text == full[:full.index(stop)]
            assert after.completions[0].finish_reason == {"reason": "stop"}
            assert len(after.completions[0].tokens) < len(before.completions[0].tokens)
        else:
            assert after.completions[0].text == full
    assert cut >= 1
