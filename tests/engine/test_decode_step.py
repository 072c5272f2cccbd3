"""Issue 16: a decode step does no work it does not need: no weight loads, I/O hand-offs, masks or read-backs
beyond what its placement asks for, and no more ATen ops than HF eager at the same shapes (with slack).

Each count of one decode step is the difference between generating n+1 and n tokens, so what a call does
once (prefill, setup) drops out.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from engine import Engine, Policy
from engine import schedule as schedule_module
from engine.api import plan_blocks
from engine.bench import decode_ops
from engine.bench.reference import POLICIES
from engine.kv_cache import LayerCache
from engine.placement import split_count

MIXED = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28], [40, 41, 42, 43]]
EVEN = [[5, 6, 7, 8], [12, 13, 14, 15], [20, 21, 22, 23], [40, 41, 42, 43]]  # no row padded
# The default device (cuda if present), and the CPU spelled as a user may spell it.
DEVICES = [None, "cpu", "cpu:0"]
# Tensor methods that read a value back to the host: on a GPU each one waits for the device.
READ_BACKS = ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__")


def per_step(eng: Engine, prompts: list[list[int]], counter: Callable[[], int], n: int = 3) -> int:
    """What the running total `counter` counts in one decode step."""
    start = counter()
    eng.generate(prompts, max_new_tokens=n)
    middle = counter()
    eng.generate(prompts, max_new_tokens=n + 1)
    return counter() - 2 * middle + start


def count_calls(monkeypatch, owner: object, names: tuple[str, ...]) -> Callable[[], int]:
    """Wrap `owner.name` for each name with a counter; returns the function reading the running total."""
    calls = [0]
    for name in names:
        original = getattr(owner, name)

        def counted(*args, _original=original, **kwargs):
            calls[0] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
    return lambda: calls[0]


# -- weights bound once -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_resident_weights_are_bound_once_and_never_loaded(tiny_models, monkeypatch, device):
    """Weights on the compute device in compute form are bound at load (Runtime.bound): every pass sees the
    same tensors, and no layer goes through a load (no buffer slot taken, nothing read or decoded)."""
    with Engine.load(tiny_models["opt"], policy=Policy(gpu_batch_size=2, num_gpu_batches=2), device=device) as eng:
        rt = eng._rt
        assert all(not layer for layer in rt.streamed)
        assert [set(b) for b in rt.bound] == [set(w) for w in rt.weights]
        seen: dict[int, list[dict]] = {}
        decoder = rt.adapter.decoder

        def recording(cfg, w, *args):
            seen.setdefault(id(w), []).append(dict(w))
            return decoder(cfg, w, *args)

        monkeypatch.setattr(rt.adapter, "decoder", recording)
        loads = count_calls(monkeypatch, schedule_module, ("read_layer", "decode_layer"))
        slots = next(rt.loads)
        eng.generate(MIXED, max_new_tokens=4)
        assert loads() == 0 and next(rt.loads) == slots + 1
        assert {id(b) for b in rt.bound[1:-1]} == set(seen)  # each decoder's one bound dict, every pass
        for calls in seen.values():
            assert all(w.keys() == calls[0].keys() and all(w[n] is calls[0][n] for n in w) for w in calls)


def test_a_layer_split_over_tiers_loads_only_what_is_not_in_place(tiny_models):
    policy = POLICIES["weights-30-30-40"]
    with Engine.load(tiny_models["opt"], policy=policy, device="cpu") as eng:
        rt = eng._rt
        for bound, streamed, weights in zip(rt.bound, rt.streamed, rt.weights, strict=True):
            assert bound.keys().isdisjoint(streamed) and {*bound, *streamed} == set(weights)
            assert all(weights[n].tier == "gpu" for n in bound) and all(weights[n].tier != "gpu" for n in streamed)
        assert any(rt.bound) and any(rt.streamed)


# -- I/O-pool hand-offs ------------------------------------------------------------------------------------------

def handoff_counter(eng: Engine, monkeypatch) -> Callable[[], int]:
    return count_calls(monkeypatch, eng._rt.io, ("submit",))


@pytest.mark.parametrize("device", DEVICES)
def test_nothing_goes_to_the_io_pool_when_everything_is_on_the_compute_device(tiny_models, monkeypatch, device):
    with Engine.load(tiny_models["opt"], policy=Policy(gpu_batch_size=2, num_gpu_batches=2), device=device) as eng:
        handoffs = handoff_counter(eng, monkeypatch)
        eng.generate(MIXED, max_new_tokens=4, echo_prompt=True)
        assert handoffs() == 0


def expected_handoffs(eng: Engine, prompts: list[list[int]]) -> int:
    """I/O-pool hand-offs of one decode step, by rule; without overlap there are none (all runs inline):

    - one per layer whose load has work for a worker (`LayerPlan.background`: direct disk reads, and on a
      GPU any read, upload or decoding), per block;
    - per decoder layer and GPU batch whose KV cache is not all resident (read in place where attention
      runs): one fetch of the cached prefix, and one write of the new rows per segment not resident;
    - per embedding or decoder layer and GPU batch whose activations have a disk share: one write.
    """
    rt, policy = eng._rt, eng.policy
    if not policy.overlap:
        return 0
    blocks = plan_blocks([len(p) for p in prompts], policy)
    total = len(blocks) * sum(plan.background for plan in rt.plans)
    for block in blocks:
        for batch in block:
            cache = LayerCache(rt, len(batch), 8)
            streamed = sum(seg.views is None for seg in cache.segments)
            cache.close()
            total += rt.cfg.n_layers * (streamed + 1 if streamed else 0)
            if "disk" in split_count(len(batch) * rt.cfg.hidden, policy.split("act")):
                total += 1 + rt.cfg.n_layers
    return total


@pytest.mark.parametrize("policy", POLICIES.values(), ids=POLICIES.keys())
def test_io_pool_handoffs_per_decode_step_follow_the_placement(tiny_models, monkeypatch, tmp_path, policy):
    with Engine.load(tiny_models["opt"], policy=policy, device="cpu", offload_dir=tmp_path) as eng:
        got = per_step(eng, MIXED, handoff_counter(eng, monkeypatch))
        assert got == expected_handoffs(eng, MIXED)


# -- the attention mask -----------------------------------------------------------------------------------------

def record_masks(monkeypatch) -> list:
    seen = []
    attend = LayerCache.attend

    def recording(self, fetched, allowed, *args):
        seen.append(allowed)
        return attend(self, fetched, allowed, *args)

    monkeypatch.setattr(LayerCache, "attend", recording)
    return seen


@pytest.mark.parametrize("device", DEVICES)
def test_the_mask_is_built_once_per_step_and_not_at_all_without_pads(tiny_models, monkeypatch, device):
    with Engine.load(tiny_models["llama"], policy=Policy(gpu_batch_size=4), device=device) as eng:
        layers = eng.config.n_layers
        seen = record_masks(monkeypatch)
        eng.generate(MIXED, max_new_tokens=3)
        passes = [seen[i:i + layers] for i in range(0, len(seen), layers)]
        assert len(passes) == 3
        for masks in passes:  # one tensor per pass, shared by every layer
            assert masks[0] is not None and all(m is masks[0] for m in masks)
        assert len({id(m[0]) for m in passes}) == 3
        seen.clear()
        eng.generate(EVEN, max_new_tokens=3)
        assert len(seen) == 3 * layers and all(m is None for m in seen)


# -- read-backs ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_p": 0.9, "top_k": 20}], ids=["greedy", "sampled"])
def test_tokens_are_read_back_once_per_gpu_batch_and_step(tiny_models, monkeypatch, sampling):
    """Choosing the token and its log-prob runs on the device; the host reads both back in one go."""
    with Engine.load(tiny_models["opt"], policy=Policy(gpu_batch_size=2, num_gpu_batches=2), device="cpu") as eng:
        reads = count_calls(monkeypatch, torch.Tensor, READ_BACKS)
        assert per_step(eng, MIXED, reads) == 2
        assert eng.generate(MIXED, max_new_tokens=4, **sampling) == eng.generate(MIXED, max_new_tokens=4, **sampling)


# -- ATen ops against HF eager -----------------------------------------------------------------------------------

# OPT-125m's 12 layers at small widths: a step's op count depends on the layer count, not on widths.
SMALL_OPT = dict(hidden_size=64, ffn_dim=128, num_hidden_layers=12, num_attention_heads=4, vocab_size=512,
                 max_position_embeddings=256)


@pytest.fixture(scope="module")
def small_systems(tmp_path_factory):
    return decode_ops.build(tmp_path_factory.mktemp("decode-ops"), batch=8, prompt=16, overrides=SMALL_OPT)


@pytest.mark.parametrize("count", [decode_ops.profiled_ops, decode_ops.dispatched_ops], ids=["profiler", "dispatch"])
def test_a_decode_step_issues_at_most_1_2x_the_ops_of_hf_eager(small_systems, count):
    """Deterministic counts, unlike time. Loading resident weights again at every step, or building the mask
    in every layer, costs tens of ops per layer and breaks the bound."""
    engine = decode_ops.step_ops(small_systems.engine, count)
    hf = decode_ops.step_ops(small_systems.hf, count)
    assert engine <= 1.2 * hf, f"engine {engine} ops per decode step against HF's {hf}"
