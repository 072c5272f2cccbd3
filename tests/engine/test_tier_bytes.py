"""The KV cache and activations go to the tiers the policy names, in the bytes their shapes give.

Exactness against HF (test_offload.py) cannot see placement: a policy that kept everything on the
gpu tier would compute the same tokens. These tests weigh each tier instead, disk included: the
most it held during a run (`GenerationStats.peak_bytes`) and what the run wrote to it (`bytes_written`),
against figures worked out from the model's shapes (helpers.expected), plain and compressed.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers.expected import expected_bytes, fractions, token_head_bytes

from engine import Engine, Policy
from engine.bench.reference import POLICIES
from engine.config import load_folder_config
from engine.policy import TIERS

MIXED = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28], [40, 41, 42, 43]]
NEW = 3  # tokens per row: a prefill pass and two decode passes

# every tier alone and in pairs and threes, one and several GPU batches and blocks, for cache and activations
PLACEMENTS = {name: POLICIES[name] for name in ("cache-half-disk", "cache-cpu-compute", "act-cpu", "act-split",
                                                "three-gpu-batches", "no-overlap")}
PLACEMENTS["three-tiers"] = Policy(gpu_batch_size=2, num_gpu_batches=2).with_percent(100, 0, 25, 50, 25, 25)
PLACEMENTS["all-disk"] = Policy(gpu_batch_size=3).with_percent(0, 100, 0, 0, 0, 0)


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _assert_tiers_hold_what_the_shapes_say(folder, policy: Policy, tmp_path) -> dict[str, int]:
    """Run MIXED under `policy` and compare each tier's peak and writes with the expected bytes; return the writes."""
    with Engine.load(folder, policy=policy, offload_dir=tmp_path) as eng:
        loaded = {t: eng.held_bytes[t] for t in TIERS}  # weights and buffers, there before and after
        outs = eng.generate(MIXED, max_new_tokens=NEW)
        assert all(o.finish_reason == "length" for o in outs)  # so every block ran all NEW passes
        exp = expected_bytes(eng.config, policy, [len(p) for p in MIXED], NEW, _elem(eng.storage_dtype),
                             _elem(eng.compute_dtype))
        held = {t: eng.stats.peak_bytes[t] - loaded[t] for t in TIERS}
        assert {t: eng.held_bytes[t] for t in TIERS} == loaded  # the run gave back all it took
    assert held["gpu"] == exp.peak["gpu"] and held["cpu"] == exp.peak["cpu"], (held, exp.peak)
    assert exp.peak["disk"] <= held["disk"] <= exp.disk_peak_most, (held, exp)
    assert eng.stats.bytes_written == exp.written
    return exp.written


@pytest.mark.parametrize("policy", PLACEMENTS.values(), ids=PLACEMENTS.keys())
@pytest.mark.parametrize("name", ["opt", "llama"])  # 4 KV heads; 2 KV heads shared by 4 query heads
def test_cache_and_activations_follow_the_policy_on_every_tier(tiny_models, tmp_path, name, policy):
    written = _assert_tiers_hold_what_the_shapes_say(tiny_models[name], policy, tmp_path)
    assert (written["disk"] > 0) == (fractions(policy, "cache")["disk"] > 0 or fractions(policy, "act")["disk"] > 0)


COMPRESSIONS = {"c4-g64": dict(comp_cache_bits=4, comp_cache_group=64),  # a group spans a whole head or block
                "c3-g4": dict(comp_cache_bits=3, comp_cache_group=4),  # several groups a head, codes across bytes
                "c3-g4-token-keys": dict(comp_cache_bits=3, comp_cache_group=4, comp_cache_keys="token")}


@pytest.mark.parametrize("comp", COMPRESSIONS.values(), ids=COMPRESSIONS.keys())
@pytest.mark.parametrize("placement", ["three-tiers", "three-gpu-batches", "all-disk"])
@pytest.mark.parametrize("name", ["opt", "llama"])
def test_compressed_cache_is_stored_compressed_on_every_tier(tiny_models, tmp_path, name, placement, comp):
    """Group-wise rows (engine.quant.groupwise) on gpu, cpu and disk alike, each a fraction of the plain row;
    keys grouped per channel in whole blocks plus a window of the unfinished block in the storage dtype."""
    policy = dataclasses.replace(PLACEMENTS[placement], compress_cache=True, **comp)
    _assert_tiers_hold_what_the_shapes_say(tiny_models[name], policy, tmp_path)
    cfg = load_folder_config(tiny_models[name])
    assert token_head_bytes(cfg, policy, 4) < token_head_bytes(cfg, PLACEMENTS[placement], 2)  # below even fp16


def test_a_run_that_passes_the_up_front_check_fits_its_disk_budget(tiny_models, tmp_path):
    policy = PLACEMENTS["act-split"]  # weights and cache on the gpu tier: the disk holds only activations
    exp = expected_bytes(load_folder_config(tiny_models["opt"]), policy, [len(p) for p in MIXED], NEW, 4, 4)
    assert 0 < exp.peak["disk"] < exp.disk_peak_most
    with Engine.load(tiny_models["opt"], policy=policy, device="cpu", offload_dir=tmp_path,
                     disk_mem=exp.peak["disk"]) as eng:
        eng.generate(MIXED, max_new_tokens=NEW)
        assert eng.stats.peak_bytes["disk"] == exp.peak["disk"]
