"""Harness pieces that need no HELM run: batching plan, request cache and its key (with tiny engines for what
the key leaves out), offline data checks, BLEU fallback, and the conversion of engine outputs into HELM
results (with SmolLM2's real tokenizer)."""

from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace

import pytest
from helm.common.request import Request, RequestResult

from engine import Engine
from engine.bench.reference import POLICIES
from engine.policy import Policy
from harness.batching import GenerationParams, plan_engine_calls
from harness.generation import TokenTexts, to_completion
from harness.helm.deployment import OUTPUT_NEUTRAL, EngineSpec
from harness.helm.engine_pool import output_identity
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


CPU_FP32 = ("cpu", "torch.float32", "torch.float32")
REQ = Request(model="flexhelm/x", model_deployment="flexhelm/x", prompt="Hi", max_tokens=3)
# A changed value for every policy field the request key must cover (all but OUTPUT_NEUTRAL and the
# dtypes, which enter resolved); a new Policy field fails test_request_key_covers_every_numeric_field
# until it is listed here or proven neutral.
NUMERIC_CHANGES = {
    "compress_weight": True, "compress_cache": True, "comp_weight_bits": 3, "comp_weight_group": 32,
    "comp_weight_dim": 0, "comp_weight_fit": "mse", "comp_cache_bits": 3, "comp_cache_group": 32,
    "comp_cache_keys": "token", "fused_int4": False, "cpu_cache_compute": True, "threads": 1, "cuda_graphs": False,
}


def _key(policy: Policy | None = None, device: tuple[str, str, str] = CPU_FP32, seed: int = 0,
         request: Request = REQ) -> str:
    spec = EngineSpec.create("smollm2-135m", None, policy or Policy(), seed=seed)
    return request_key(spec.output_identity(*device), request)


def test_request_key_covers_every_numeric_field():
    fields = {f.name for f in dataclasses.fields(Policy)}
    assert set(NUMERIC_CHANGES) == fields - set(OUTPUT_NEUTRAL) - {"compute_dtype", "storage_dtype"}
    key = _key()
    for name, value in NUMERIC_CHANGES.items():
        assert _key(Policy(**{name: value})) != key, name
    assert _key(seed=1) != key
    assert _key(request=Request(**{**REQ.__dict__, "prompt": "Ho"})) != key


def test_request_key_covers_device_and_effective_dtypes():
    key = _key()
    assert _key(device=("cuda", "torch.float16", "torch.float16")) != key  # Policy() on a GPU
    assert _key(device=("cuda", "torch.float32", "torch.float32")) != key  # the device alone
    assert _key(device=("cpu", "torch.bfloat16", "torch.float32")) != key  # compute dtype alone
    assert _key(device=("cpu", "torch.float32", "torch.float16")) != key  # storage dtype alone


def test_request_key_ignores_placement_io_and_batching():
    key = _key()
    for same in (Policy().with_percent(0, 50, 0, 100, 0, 100), Policy(overlap=False, pin_weight=False,
                                                                        direct_io=True),
                 Policy(gpu_batch_size=2, num_gpu_batches=3)):
        assert _key(same) == key


def test_request_key_takes_dtypes_the_engine_resolved(tiny_models):
    """On a CPU, no compute dtype means fp32: the same key as fp32 by name; bf16 is another key."""
    def identity(policy: Policy) -> dict:
        spec = EngineSpec.create(str(tiny_models["llama"]), None, policy)
        with Engine.load(spec.model, policy=policy) as engine:
            return output_identity(spec, engine)

    default = identity(Policy())
    assert (default["device"], default["policy"]["compute_dtype"]) == ("cpu", "torch.float32")
    assert identity(Policy(compute_dtype="fp32")) == default
    bf16 = identity(Policy(compute_dtype="bf16"))
    assert bf16["policy"]["compute_dtype"] == bf16["policy"]["storage_dtype"] == "torch.bfloat16"


@pytest.mark.parametrize("name", ["opt", "llama"])
def test_placements_agree_to_float_rounding(tiny_models, tmp_path, name):
    """Why placement is left out of the request key: with the same batching, every placement and I/O
    setting of the engine's policy matrix gives the same tokens, and log-probs equal to fp32 rounding (on a
    CPU a resident weight is multiplied from an (in, out) layout, engine.runtime.InputMajor, an offloaded
    one by F.linear: the same products, summed in another order)."""
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28], [40, 41, 42, 43]]
    outputs = []
    for policy in POLICIES.values():
        policy = dataclasses.replace(policy, gpu_batch_size=2, num_gpu_batches=2)
        with Engine.load(tiny_models[name], policy=policy, offload_dir=tmp_path) as engine:
            outs = engine.generate(prompts, max_new_tokens=4, echo_prompt=True)
        outputs.append([(o.token_ids, o.logprobs, o.prompt_logprobs) for o in outs])
    for out in outputs[1:]:
        for (tokens, lps, prompt_lps), (ref_tokens, ref_lps, ref_prompt_lps) in zip(out, outputs[0], strict=True):
            assert tokens == ref_tokens
            assert lps == pytest.approx(ref_lps, abs=2e-6, rel=0)
            assert prompt_lps[1:] == pytest.approx(ref_prompt_lps[1:], abs=2e-6, rel=0)


def test_request_cache_roundtrip(tmp_path):
    key = _key()
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
