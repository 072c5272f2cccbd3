"""The CPU attention benchmark (engine.bench.attention) at tiny shapes: its paths compute the same attention."""

from __future__ import annotations

import pytest
import torch

from engine.bench.attention import (
    FLEXGEN_MHA,
    FLEXGEN_PATH,
    HEADER,
    bench,
    engine_attention,
    flexgen_attention,
    make_step,
    sdpa_floor,
)
from engine.bench.flexgen_peer import find_wheel
from engine.config import ModelConfig
from engine.policy import DTYPES

TINY = ModelConfig(family="opt", vocab_size=64, hidden=64, n_layers=1, n_heads=4, ffn=64, max_positions=64)
TOL = {"fp16": 2e-3, "bf16": 2e-2}


def _step(pads=None):
    return make_step(TINY, 3, 11, torch.device("cpu"), torch.float32, pads)


@pytest.mark.skipif(find_wheel() is None, reason="FlexGen 0.1.8's wheel is not in ../shared/wheels")
@pytest.mark.parametrize("storage", ["fp16", "bf16"])
def test_engine_and_flexgen_paths_compute_the_same_attention(storage):
    step = _step(pads=[0, 4, 1])  # left pads: masked alike by both
    alone, whole = flexgen_attention(TINY, step)
    reference = alone()
    assert reference.shape == step.q.shape and reference.dtype == torch.float32
    engine = engine_attention(TINY, step, storage)
    for _ in range(2):  # every call does the same step again
        torch.testing.assert_close(engine(), reference, atol=TOL[storage], rtol=TOL[storage])
        torch.testing.assert_close(whole(), reference)


def test_sdpa_floor_computes_the_engine_paths_attention():
    step = _step()
    for storage in ("fp16", "bf16"):
        floor = sdpa_floor(step, DTYPES[storage])().transpose(1, 2)
        torch.testing.assert_close(floor.float(), engine_attention(TINY, step, storage)(), atol=TOL[storage],
                                   rtol=TOL[storage])


def test_bench_rows_give_every_path_and_its_ratio_to_flexgen():
    flexgen = find_wheel() is not None
    rows = bench(TINY, 2, 6, torch.device("cpu"), ["fp16"], repeats=1, rounds=1, flexgen=flexgen)
    assert all(len(row) == len(HEADER) and row[1] > 0 for row in rows)
    names = [row[0] for row in rows]
    assert names[0] == "engine, fp16 cache" and (FLEXGEN_PATH in names) == (FLEXGEN_MHA in names) == flexgen
    for row in rows:
        assert (row[2] is None) == (not flexgen)
