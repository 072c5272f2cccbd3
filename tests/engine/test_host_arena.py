"""Issue 16: a memory tier's weights on the host are views of one arena: one allocation of exactly the aligned
sizes, every view aligned and its own, pinned once (only where the compute device is CUDA), outputs unchanged."""

from __future__ import annotations

import gc

import torch
from helpers.reference import assert_matches_hf

from engine import Engine
from engine.bench.reference import POLICIES
from engine.storage import arena as arena_module
from engine.storage.arena import VIEW_ALIGN, HostArena, aligned
from engine.storage.tiers import make_tiers

SIZES = [1, 63, 64, 65, 4096, 0, 1000]
MIXED = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28], [40, 41, 42, 43]]


def test_views_are_aligned_disjoint_and_round_trip():
    arena = HostArena(SIZES, pin=False)
    assert arena.nbytes == sum(aligned(n) for n in SIZES) == 64 + 64 + 64 + 128 + 4096 + 0 + 1024
    assert arena.buf.numel() == arena.nbytes
    views = [arena.view(i) for i in range(len(SIZES))]
    assert [v.numel() for v in views] == SIZES
    assert all(v.data_ptr() % VIEW_ALIGN == 0 for v in views if v.numel())
    assert len({v.untyped_storage().data_ptr() for v in views}) == 1  # one allocation
    for i, v in enumerate(views):
        v.fill_(i + 1)
    for i, v in enumerate(views):
        assert bool((v == i + 1).all())  # nothing another view wrote reached it


def test_pinning_registers_the_whole_arena_once_and_releases_it(monkeypatch):
    calls = []
    monkeypatch.setattr(arena_module, "_register", lambda buf: calls.append(("pin", buf.data_ptr(), buf.numel())))
    monkeypatch.setattr(arena_module, "_unregister", lambda ptr: calls.append(("unpin", ptr)))
    arena = HostArena(SIZES, pin=True)
    ptr, nbytes = arena.buf.data_ptr(), arena.nbytes
    assert calls == [("pin", ptr, nbytes)]
    del arena
    gc.collect()
    assert calls == [("pin", ptr, nbytes), ("unpin", ptr)]


def test_the_cpu_tier_pins_only_for_a_cuda_device(tmp_path):
    tiers = make_tiers(torch.device("cpu"), None, None, tmp_path, None, False, pin=True)
    assert not tiers["cpu"].pin
    tiers["disk"].close()


def test_each_host_tier_holds_its_weights_in_one_arena(tiny_models, hf_model, tmp_path):
    """Weights split three ways: the gpu tier (host memory here) and the cpu tier each one allocation whose
    stores are exactly the weights' bytes, and the engine still gives HF's outputs."""
    policy = POLICIES["weights-30-30-40"]
    with Engine.load(tiny_models["opt"], policy=policy, device="cpu", offload_dir=tmp_path) as eng:
        weights = [sw for layer in eng._rt.weights for sw in layer.values()]
        for tier in ("gpu", "cpu"):
            mine = [sw for sw in weights if sw.tier == tier]
            assert mine and len({sw.store.buf.untyped_storage().data_ptr() for sw in mine}) == 1
            assert all(sw.store.buf.data_ptr() % VIEW_ALIGN == 0 for sw in mine)
            assert sum(sw.store.buf.numel() for sw in mine) == sum(sw.codec.nbytes for sw in mine)
            assert eng.held_bytes[tier] >= sum(sw.codec.nbytes for sw in mine)
        assert_matches_hf(eng, hf_model(tiny_models["opt"]), MIXED, max_new=4, echo=True)
