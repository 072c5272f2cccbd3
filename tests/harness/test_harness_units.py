"""Harness pieces that need no model: batching plan, request cache, offline data checks, BLEU fallback,
and the conversion of engine outputs into HELM results (with SmolLM2's real tokenizer)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
from helm.common.request import Request, RequestResult

from engine.policy import Policy
from harness.batching import GenerationParams, plan_engine_calls
from harness.generation import TokenTexts, to_completion
from harness.helm.deployment import EngineSpec
from harness.helm.request_cache import RequestCache, request_key
from harness.suites import bind_model, load_run_entries
from scenarios.offline import check_before_run_spec, check_run_spec, link_data_dir


def test_plan_never_mixes_parameters_and_buckets_by_length():
    keys = ["a", "b"] * 10
    lengths = [(i * 37) % 23 + 1 for i in range(20)]
    calls = plan_engine_calls(keys, lengths, block_size=4)
    assert sorted(i for call in calls for i in call) == list(range(20))
    for call in calls:
        assert len(call) <= 4 and len({keys[i] for i in call}) == 1
    for key in "ab":  # within a key, calls hold consecutive lengths, longest first
        seq = [lengths[i] for call in calls for i in call if keys[i] == key]
        assert seq == sorted(seq, reverse=True)
    # padding after bucketing is no worse than padding each call in arrival order
    def padded(cs):
        return sum(max(lengths[i] for i in c) * len(c) for c in cs)
    arrival = [[i for i in range(20) if keys[i] == k][s:s + 4] for k in "ab" for s in range(0, 10, 4)]
    assert padded(calls) < padded(arrival)


def test_generation_params_separate_what_changes_an_engine_call():
    base = Request(model="m", model_deployment="m", prompt="x", temperature=0.0, max_tokens=5, stop_sequences=["\n"])
    same = Request(model="m", model_deployment="m", prompt="other prompt", temperature=0.0, max_tokens=5,
                   stop_sequences=["\n"])
    assert GenerationParams.of(base) == GenerationParams.of(same)
    for change in ({"max_tokens": 6}, {"stop_sequences": ["\n\n"]}, {"echo_prompt": True},
                   {"temperature": 0.5}, {"num_completions": 2}):
        other = Request(**{**base.__dict__, **change})
        assert GenerationParams.of(other) != GenerationParams.of(base)


def test_request_cache_roundtrip_and_key(tmp_path):
    spec = EngineSpec.create("smollm2-135m", None, Policy())
    req = Request(model="flexhelm/x", model_deployment="flexhelm/x", prompt="Hi", max_tokens=3)
    key = request_key(spec.output_identity(), req)
    # placement and batching do not change outputs; compression, dtype and seed do
    assert key == request_key(EngineSpec.create("smollm2-135m", None, Policy(gpu_batch_size=2,
                                                num_gpu_batches=3, w_gpu_percent=50, w_cpu_percent=50))
                              .output_identity(), req)
    for other in (Policy(compress_weight=True), Policy(compute_dtype="bf16")):
        assert key != request_key(EngineSpec.create("smollm2-135m", None, other).output_identity(), req)
    assert key != request_key(EngineSpec.create("smollm2-135m", None, Policy(), seed=1).output_identity(), req)
    assert key != request_key(spec.output_identity(), Request(**{**req.__dict__, "prompt": "Ho"}))

    cache = RequestCache(tmp_path / "c.sqlite")
    result = RequestResult(success=True, embedding=[], completions=[], cached=False, batch_size=7,
                           batch_request_time=1.5, request_time=1.5)
    assert cache.get(key) is None
    cache.put_many([(key, result)])
    back = cache.get(key)
    assert back.cached and back.batch_size == 7 and back.batch_request_time == 1.5
    cache.put_many([(key, result)])
    assert cache.compute_counts() == {key: 2}
    cache.close()
    assert RequestCache(tmp_path / "c.sqlite").get(key) is not None  # survives reopening


@pytest.fixture(scope="module")
def texts(smollm2):
    from transformers import AutoTokenizer

    return TokenTexts(AutoTokenizer.from_pretrained(smollm2))


def _out(texts, text, reason, extra_ids=(), prompt_logprobs=None):
    ids = texts.tokenizer(text, add_special_tokens=False)["input_ids"] + list(extra_ids)
    return SimpleNamespace(token_ids=ids, logprobs=[-0.5] * len(ids), finish_reason=reason,
                           prompt_logprobs=prompt_logprobs)


def test_completion_cuts_at_a_multi_token_stop_sequence(texts):
    req = Request(prompt="Q", max_tokens=20, stop_sequences=["\n\nQuestion:"])
    out = _out(texts, " 42 apples\n\nQuestion: how", "stop")
    c = to_completion(texts, req, [1], out, eos_ids=(2,))
    assert c.text == " 42 apples"
    assert "".join(t.text for t in c.tokens) == " 42 apples"
    assert c.finish_reason == {"reason": "stop"} and c.logprob == pytest.approx(-0.5 * len(c.tokens))


def test_completion_maps_eos_to_endoftext_and_drops_the_eos_token(texts):
    out = _out(texts, " Paris.", "eos", extra_ids=[2])
    c = to_completion(texts, Request(prompt="Q", max_tokens=20), [1], out, eos_ids=(2,))
    assert c.text == " Paris." and c.finish_reason == {"reason": "endoftext"}
    assert len(c.tokens) == len(out.token_ids) - 1


def test_echo_prompt_returns_prompt_tokens_with_their_logprobs(texts):
    prompt = "The cat sat on the mat."
    ids = texts.encode_prompt(prompt)
    out = SimpleNamespace(token_ids=[], logprobs=[], finish_reason="length",
                          prompt_logprobs=[None] + [-1.0] * (len(ids) - 1))
    c = to_completion(texts, Request(prompt=prompt, max_tokens=0, echo_prompt=True), ids, out, eos_ids=(2,))
    assert c.text == prompt and len(c.tokens) == len(ids)
    assert "".join(t.text for t in c.tokens) == prompt
    assert c.logprob == pytest.approx(-(len(ids) - 1))


def test_suite_entries_bind_to_our_model():
    name, entries = load_run_entries("smoke", ["mmlu:subject=anatomy"])
    assert name == "smoke" and len(entries) == 4
    bound = [bind_model(e, "flexhelm/m").description for e in entries]
    assert all("model=flexhelm/m" in d for d in bound)
    assert "model=openai/gpt2" in bind_model(type(entries[0])("mmlu:model=openai/gpt2"), "flexhelm/m").description


def test_helm_lite_suite_holds_lite_priority_two_entries():
    _, entries = load_run_entries("helm-lite", [])
    assert all(e.priority <= 2 for e in entries)
    names = {e.description.split(":")[0] for e in entries}
    assert names == {"narrative_qa", "natural_qa", "commonsense", "mmlu", "math", "gsm", "legalbench", "med_qa",
                     "wmt_14"}


def test_data_dir_is_linked_never_written(tmp_path):
    data = tmp_path / "data"
    (data / "gsm").mkdir(parents=True)
    (data / "gsm" / "gsm_data_train").write_text("{}\n")
    (data / "gsm" / "gsm_data_train.lock").write_text("")
    os.chmod(data / "gsm", 0o555)
    try:
        out = tmp_path / "out" / "scenarios"
        assert link_data_dir(data, out) == ["gsm"]
        assert (out / "gsm" / "gsm_data_train").is_symlink()
        assert not (out / "gsm" / "gsm_data_train.lock").exists()
        check = check_run_spec("gsm", {}, [], out)  # the test split is missing
        assert not check.ok and "gsm_data_test" in check.reason
        (data / "gsm").chmod(0o755)
        (data / "gsm" / "gsm_data_test").write_text("{}\n")
        link_data_dir(data, out)  # linking twice is fine
        assert check_run_spec("gsm", {}, [], out).ok
    finally:
        os.chmod(data / "gsm", 0o755)


def test_offline_checks_name_the_known_traps(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    assert check_run_spec("synthetic_reasoning", {"mode": "pattern_match"}, [], tmp_path).ok
    assert "taken off" in check_before_run_spec("math", {"subject": "algebra"}, tmp_path).reason
    assert "legalbench" in check_before_run_spec("legalbench", {"subset": "proa"}, tmp_path).reason
    assert "summarization extras" in check_run_spec(
        "summarization", {}, ["helm.benchmark.metrics.summarization_metrics.SummarizationMetric"], tmp_path).reason
    assert "wmt14" in check_run_spec("WMT_14", {}, [], tmp_path).reason
    (tmp_path / "hf" / "wmt14").mkdir(parents=True)
    assert check_run_spec("WMT_14", {}, [], tmp_path).ok
    mmlu = check_run_spec("mmlu", {"subject": "anatomy"}, [], tmp_path)
    assert not mmlu.ok and "anatomy_dev.csv" in mmlu.reason
    assert "--data-dir" in check_run_spec("narrativeqa", {}, [], tmp_path).reason


def test_bleu_works_offline_with_the_punkt_fallback(tmp_path):
    from scenarios.nltk_fallback import ensure_punkt_tab

    ensure_punkt_tab(tmp_path)
    from helm.benchmark.metrics.evaluate_reference_metrics import bleu_1, bleu_4

    assert bleu_1("The cat sat on the mat.", "The cat sat on the mat.") == pytest.approx(1.0)
    assert 0 < bleu_1("The cat sat on the mat.", "A cat sat on a mat.") < 1
    assert bleu_4("Mr. Smith went home. He slept.", "Dr. Who flew away!") < 0.5
