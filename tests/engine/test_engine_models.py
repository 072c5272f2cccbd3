"""Issue 2: the engine's models are exact against HF transformers on the same weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers.reference import TOL, assert_matches_hf
from safetensors.torch import load_file

from engine import Engine, Policy, UserError
from engine.bench.reference import hf_prompt_logprobs

MIXED = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30], [40, 41, 42, 43]]
# The default device (cuda if present), and the CPU spelled as a user may spell it.
DEVICES = [None, "cpu", "cpu:0"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["opt", "opt350", "llama"])
@pytest.mark.parametrize("gbs", [1, 3])
def test_tiny_models_match_hf(tiny_models, hf_model, name, gbs, device):
    eng = Engine.load(tiny_models[name], policy=Policy(gpu_batch_size=gbs, num_gpu_batches=2), device=device)
    assert eng.tokenizer is None
    assert_matches_hf(eng, hf_model(tiny_models[name]), MIXED, max_new=6, echo=True)


def test_padding_does_not_change_a_row(tiny_models):
    eng = Engine.load(tiny_models["llama"], policy=Policy(gpu_batch_size=4))
    alone = eng.generate([MIXED[1]], max_new_tokens=5)[0]
    mixed = eng.generate(MIXED, max_new_tokens=5)[1]
    assert mixed.token_ids == alone.token_ids
    assert max(abs(a - b) for a, b in zip(mixed.logprobs, alone.logprobs, strict=True)) < 1e-5
    assert eng.stats.padded_prompt_tokens > eng.stats.prompt_tokens


def test_smollm2_matches_hf_text_and_stop_strings(smollm2, hf_model):
    eng = Engine.load("smollm2-135m", policy=Policy(gpu_batch_size=3))
    hf = hf_model(smollm2)
    tok = eng.tokenizer
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far"]
    prompts = [tok(t).input_ids for t in texts]
    assert_matches_hf(eng, hf, prompts, max_new=8, echo=True)
    # stop strings that span several tokens: HF stops on the same token, our text is cut before the stop
    full = eng.generate(texts, max_new_tokens=12)
    for text, out in zip(texts, full, strict=True):
        stop = tok.decode(out.token_ids[3:6])
        assert len(tok(stop, add_special_tokens=False).input_ids) > 1
        got = eng.generate([text], max_new_tokens=12, stop=[stop])[0]
        ref = hf.generate(torch.tensor([tok(text).input_ids]), max_new_tokens=12, do_sample=False,
                          stop_strings=[stop], tokenizer=tok, pad_token_id=tok.pad_token_id)
        assert got.token_ids == ref[0, len(tok(text).input_ids):].tolist()
        assert got.finish_reason == "stop" and stop not in got.text
        assert got.text == tok.decode(out.token_ids)[:tok.decode(out.token_ids).find(stop)]


def test_eos_is_the_last_token_and_left_out_of_text(tiny_models, tmp_path):
    with Engine.load(tiny_models["opt"]) as eng:
        free = eng.generate(MIXED, max_new_tokens=4)
    folder = tmp_path / "eos"
    shutil.copytree(tiny_models["opt"], folder)  # the generation config's EOS ids are the ones generate stops on
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": free[0].token_ids[0]}))
    with Engine.load(folder) as eng:
        outs = eng.generate(MIXED, max_new_tokens=4)
    assert outs[0].finish_reason == "eos" and outs[0].token_ids == free[0].token_ids[:1]
    for before, after in zip(free[1:], outs[1:], strict=True):  # other rows run on, cut at their own EOS
        n = len(after.token_ids)
        assert after.token_ids == before.token_ids[:n]
        assert after.finish_reason == ("eos" if after.token_ids[-1] == free[0].token_ids[0] else "length")


def test_seeded_sampling_ignores_batch_composition(tiny_models):
    eng = Engine.load(tiny_models["llama"], policy=Policy(gpu_batch_size=2))
    kw = dict(max_new_tokens=6, temperature=0.9, top_p=0.9, top_k=50, seed=7)
    together = eng.generate(MIXED, **kw)
    assert eng.generate(MIXED[2:3], **kw)[0].token_ids != together[2].token_ids  # row 0 of a new list
    reordered = eng.generate([MIXED[3], MIXED[1], MIXED[2], MIXED[0]], **kw)
    assert len({tuple(o.token_ids) for o in together}) > 1
    again = eng.generate(MIXED, **kw)
    assert [o.token_ids for o in again] == [o.token_ids for o in together]
    assert reordered[2].token_ids == together[2].token_ids  # same row index, other neighbours


def test_zero_new_tokens_with_echo_scores_the_prompt(tiny_models, hf_model):
    eng = Engine.load(tiny_models["opt"])
    out = eng.generate(MIXED, max_new_tokens=0, echo_prompt=True)
    assert all(o.token_ids == [] and len(o.prompt_logprobs) == len(p) for o, p in zip(out, MIXED, strict=True))
    for o, prompt in zip(out, MIXED, strict=True):
        ref = hf_prompt_logprobs(hf_model(tiny_models["opt"]), prompt)
        assert o.prompt_logprobs[0] is None
        assert max(abs(a - b) for a, b in zip(o.prompt_logprobs[1:], ref, strict=True)) < TOL


def test_dummy_weights_are_seeded(tiny_models):
    """Two loads with one seed give the same weights, bit for bit; another seed gives other weights."""
    def run(seed: int) -> list[list[float]]:
        with Engine.load(tiny_models["opt"], weights="dummy", seed=seed) as eng:
            return [o.logprobs for o in eng.generate(MIXED, max_new_tokens=3)]

    first = run(0)
    assert run(0) == first
    assert run(1) != first


def test_dummy_weights_borrow_the_embedded_tokenizer(smollm2):
    with Engine.load("opt-125m", weights="dummy") as eng:
        assert eng.tokenizer is not None and eng.tokenizer.name_or_path == str(smollm2)
        out = eng.generate(["Hello there"], max_new_tokens=3)[0]
    body = out.token_ids[:-1] if out.finish_reason == "eos" else out.token_ids
    assert out.token_ids and out.text == eng.tokenizer.decode(body)


def test_opt_without_weights_is_a_user_error():
    with pytest.raises(UserError, match="no real weights"):
        Engine.load("opt-1.3b")


def test_text_prompt_without_tokenizer_is_a_user_error(tiny_models):
    with pytest.raises(UserError, match="tokenizer"):
        Engine.load(tiny_models["opt"]).generate(["hello"], max_new_tokens=1)


def test_sharded_safetensors_and_bin_checkpoints_load_alike(tiny_models, hf_model, tmp_path):
    hf = hf_model(tiny_models["llama"])
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    as_bin = tmp_path / "bin"
    as_bin.mkdir()
    shutil.copy(tiny_models["llama"] / "config.json", as_bin)
    torch.save(load_file(tiny_models["llama"] / "model.safetensors"), as_bin / "pytorch_model.bin")
    expected = Engine.load(tiny_models["llama"]).generate(MIXED, max_new_tokens=4)
    for folder in (sharded, as_bin):
        got = Engine.load(folder).generate(MIXED, max_new_tokens=4)
        assert [o.token_ids for o in got] == [o.token_ids for o in expected]
        assert [o.logprobs for o in got] == [o.logprobs for o in expected]
