"""The flexhelm lm-eval backend against lm-eval's own `hf` backend on a tiny random LLaMA with SmolLM2's
tokenizer, on the offline tasks; the engine's prompt top-1 against HF's argmax; model_args errors."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from helpers.paths import HELM_DATA

from engine import Engine, Policy, UserError

needs_data = pytest.mark.skipif(not (HELM_DATA / "mmlu").is_dir(),
                                reason=f"offline HELM data not found at {HELM_DATA} (../shared/data)")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
REPO = Path(__file__).resolve().parents[2]
MAX_LENGTH = 511  # both backends: the engine places one more position than it scores


@pytest.fixture(scope="module")
def sharp_llama(tmp_path_factory, smollm2):
    """A 2-layer random LLaMA with SmolLM2's vocabulary and tokenizer files, as a real checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("lm-eval-llama")
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper than the default init, so greedy tokens are far from ties
        model.model.embed_tokens.weight.mul_(25)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (smollm2 / name).is_file():
            shutil.copy(smollm2 / name, folder / name)
    return folder


def test_prompt_top1_is_hf_argmax(tiny_models, hf_model):
    """Left-padded rows of different lengths, two GPU batches: each position's top-1 is HF's argmax."""
    folder = tiny_models["llama"]
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 320, (n,), generator=gen).tolist() for n in (9, 3, 17, 70)]
    with Engine.load(str(folder), policy=Policy(gpu_batch_size=2, num_gpu_batches=2)) as eng:
        outs = eng.generate(prompts, max_new_tokens=0, prompt_top1=True)
        plain = eng.generate(prompts, max_new_tokens=0, echo_prompt=True)
    model = hf_model(folder)
    for prompt, out, ref in zip(prompts, outs, plain, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0, :-1]
        assert out.prompt_top1 == [None, *logits.argmax(-1).tolist()]
        assert out.prompt_logprobs == ref.prompt_logprobs and ref.prompt_top1 is None


_TASKS: list = []  # lm-eval's TaskManager indexes thousands of task files: once per module


def _evaluate(lm, tasks: list[str], **kw) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from harness.lm_eval import TASKS_DIR

    if not _TASKS:
        _TASKS.append(TaskManager(include_path=str(TASKS_DIR)))
    return simple_evaluate(model=lm, tasks=tasks, task_manager=_TASKS[0], log_samples=True, **kw)


@pytest.fixture(scope="module")
def both(sharp_llama):
    from lm_eval.models.huggingface import HFLM

    from harness.lm_eval_backend import FlexhelmLM

    hf = HFLM(pretrained=str(sharp_llama), device="cpu", dtype="float32", batch_size=4, max_length=MAX_LENGTH)
    ours = FlexhelmLM(pretrained=str(sharp_llama), device="cpu", gpu_batch_size=2, num_gpu_batches=2,
                      percent="50;50;100;0;100;0")
    yield hf, ours
    ours.engine.close()


@needs_data
def test_multiple_choice_matches_hf(both):
    hf, ours = both
    task = "flexhelm_mmlu_abstract_algebra"
    results = [_evaluate(lm, [task], limit=6, num_fewshot=1) for lm in both]
    a, b = (r["samples"][task] for r in results)
    for sa, sb in zip(a, b, strict=True):
        assert sa["doc_id"] == sb["doc_id"]
        lla, ga = ([r[0][k] for r in sa["resps"]] for k in (0, 1))
        llb, gb = ([r[0][k] for r in sb["resps"]] for k in (0, 1))
        assert max(abs(x - y) for x, y in zip(lla, llb, strict=True)) < 1e-4
        assert ga == gb
        assert sa["acc"] == sb["acc"]
    acc = [r["results"][task]["acc,none"] for r in results]
    assert acc[0] == acc[1]
    assert ours.counts.engine_calls == -(-24 // 4)  # 6 questions x 4 choices in blocks of 2x2 rows


@needs_data
def test_generation_and_is_greedy_match_hf(both):
    """generate_until answers are the same text. Scoring continuations after GSM8K prompts, both backends agree on
    log-likelihoods and is_greedy; the model's sharpened tied embeddings repeat the last word, so " the" after
    "... the" is greedy, a case MMLU's random answers never reach."""
    from lm_eval.api.instance import Instance

    kw = dict(limit=3, num_fewshot=0, gen_kwargs="max_gen_toks=12")
    samples = [_evaluate(lm, ["flexhelm_gsm8k"], **kw)["samples"]["flexhelm_gsm8k"] for lm in both]
    texts = [[s["resps"][0][0] for s in side] for side in samples]
    assert texts[0] == texts[1] and any(texts[0])
    contexts = [s["arguments"][0][0] for s in samples[0]]
    pairs = [(c + " the", " the") for c in contexts] + [(c, t) for c, t in zip(contexts, texts[0], strict=True)]
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    scored = [lm.loglikelihood(reqs) for lm in both]
    assert max(abs(x[0] - y[0]) for x, y in zip(*scored, strict=True)) < 1e-4
    assert [x[1] for x in scored[0]] == [y[1] for y in scored[1]]
    assert any(x[1] for x in scored[0]) and not all(x[1] for x in scored[0])


def test_rolling_windows_match_hf(both):
    """A text longer than the context is scored in windows; the sum equals the hf backend's."""
    from lm_eval.api.instance import Instance

    text = " ".join(f"word{i}" for i in range(700))
    reqs = [Instance("loglikelihood_rolling", {}, (text,), 0), Instance("loglikelihood_rolling", {}, ("Hi",), 1)]
    hf, ours = both
    assert len(ours.tok_encode(text)) > MAX_LENGTH
    got, want = ours.loglikelihood_rolling(reqs), hf.loglikelihood_rolling(reqs)
    assert got == pytest.approx(want, abs=1e-3)


@pytest.mark.parametrize("args, message", [
    ({"gpu_batch_sise": 2}, "unknown key 'gpu_batch_sise'"),
    ({"percent": "0;0;100"}, "--percent"),
    ({"compress": "all"}, "invalid choice"),
])
def test_model_args_errors_are_one_line(args, message):
    from harness.lm_eval_args import parse_options

    with pytest.raises(UserError, match=message) as info:
        parse_options(args)
    assert "\n" not in str(info.value)


def test_model_args_reach_the_policy():
    from harness.lm_eval_args import policy_of

    policy = policy_of({"pretrained": "x", "percent": "0;0;100;0;100;0", "compress": "weight", "comp_bits": 2,
                        "cpu_cache_compute": True, "gpu_batch_size": 4, "num_gpu_batches": 3, "device": "cpu"})
    assert policy.percent == (0, 0, 100, 0, 100, 0) and policy.compress_weight and not policy.compress_cache
    assert policy.comp_weight_bits == 2 and policy.cpu_cache_compute and policy.block_size == 12


@needs_data
def test_killed_cached_run_resumes_without_recomputing(both, sharp_llama, tmp_path):
    """A `--use_cache` CLI run SIGKILLed after 2 of its 4 engine calls; the rerun computes only the other 2 blocks
    and gives the answers an uncached run gives."""
    import os
    import subprocess
    import sys

    from harness.lm_eval_backend import KILL_AFTER_CALLS_ENV

    hf, ours = both
    task, cache = "flexhelm_mmlu_abstract_algebra", tmp_path / "cache"
    argv = [sys.executable, "-m", "harness.lm_eval", "--model", "flexhelm", "--model_args",
            f"pretrained={sharp_llama},gpu_batch_size=2,num_gpu_batches=2", "--tasks", task, "--limit", "4",
            "--device", "cpu", "--use_cache", str(cache)]
    env = {**os.environ, KILL_AFTER_CALLS_ENV: "2", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    before = dataclasses.replace(ours.counts)
    resumed = _evaluate(ours, [task], limit=4, use_cache=str(cache))
    assert (ours.counts.engine_calls - before.engine_calls, ours.counts.rows - before.rows) == (2, 8)
    fresh = _evaluate(ours, [task], limit=4)
    assert [s["resps"] for s in resumed["samples"][task]] == [s["resps"] for s in fresh["samples"][task]]
