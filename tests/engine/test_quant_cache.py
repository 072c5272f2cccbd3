"""Issue 19: compressed weights are encoded once per checkpoint and scheme, then read back from a disk cache."""

from __future__ import annotations

import pickle

import pytest

from engine import Engine, Policy
from engine.quant import codec as codec_module

W4 = Policy(compress_weight=True, comp_weight_dim=1, comp_weight_group=32)
PROMPTS = [[5, 6, 7, 8, 9], [12, 13, 14]]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache root, and a counter of weights quantized (not read back) by each load."""
    monkeypatch.setenv("FLEXHELM_CACHE", str(tmp_path / "cache"))
    calls = {"n": 0}
    encode = codec_module.groupwise.encode_weight

    def counting(*args, **kwargs):
        calls["n"] += 1
        return encode(*args, **kwargs)

    monkeypatch.setattr(codec_module.groupwise, "encode_weight", counting)
    return tmp_path / "cache" / "encoded", calls


def _run(model, policy: Policy) -> tuple[list, list]:
    with Engine.load(model, policy=policy) as eng:
        outs = eng.generate(PROMPTS, max_new_tokens=4)
    return [o.token_ids for o in outs], [o.logprobs for o in outs]


def test_second_load_reads_the_cache_and_computes_the_same(tiny_models, cache):
    root, calls = cache
    first = _run(tiny_models["llama"], W4)
    encoded = calls["n"]
    assert encoded > 0 and len(list(root.iterdir())) == 1
    second = _run(tiny_models["llama"], W4)
    assert calls["n"] == encoded  # nothing quantized again
    assert second == first


def test_the_cache_is_keyed_by_scheme_and_checkpoint(tiny_models, cache):
    root, calls = cache
    _run(tiny_models["llama"], W4)
    for policy, model in [(Policy(compress_weight=True, comp_weight_dim=1, comp_weight_group=64), "llama"),
                          (Policy(compress_weight=True, comp_weight_dim=1, comp_weight_group=32,
                                  comp_weight_fit="mse"), "llama"),
                          (W4, "opt")]:
        before = calls["n"]
        _run(tiny_models[model], policy)
        assert calls["n"] > before, (policy, model)
    assert len(list(root.iterdir())) == 4
    _run(tiny_models["llama"], Policy())  # uncompressed: nothing cached
    assert len(list(root.iterdir())) == 4


@pytest.mark.parametrize("damage", ["garbage", "truncated", "pickle", "manifest"])
def test_a_damaged_entry_is_reported_in_one_line_and_encoded_again(tiny_models, cache, capfd, tmp_path, damage):
    root, calls = cache
    first = _run(tiny_models["llama"], W4)
    (entry,) = root.iterdir()
    layer = entry / "layer-00001.safetensors"
    marker = tmp_path / "unpickled"
    if damage == "garbage":
        layer.write_bytes(layer.read_bytes()[:100] + b"\xff" * 64 + layer.read_bytes()[164:])
    elif damage == "truncated":
        layer.write_bytes(layer.read_bytes()[:-10])
    elif damage == "pickle":  # a payload that would leave a marker file if anything unpickled it
        layer.write_bytes(pickle.dumps(_Touch(str(marker))))
    else:
        (entry / "manifest.json").write_text("{not json")
    capfd.readouterr()
    before = calls["n"]
    assert _run(tiny_models["llama"], W4) == first
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "encoded-weight cache" in line]
    assert len(lines) == 1 and "damaged" in lines[0] and "Traceback" not in err
    assert calls["n"] > before and not marker.exists()
    before = calls["n"]
    _run(tiny_models["llama"], W4)  # the re-encoded entry replaced the damaged one
    assert calls["n"] == before


class _Touch:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))
