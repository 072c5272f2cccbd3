"""The attention benchmarks at tiny shapes: engine.bench.attention's paths compute the same attention, and
engine.bench.cache_keys times each cache scheme against per-token keys."""

from __future__ import annotations

import pytest
import torch

from engine.bench import cache_keys
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


def test_cache_keys_bench_times_each_cache_and_compares_with_per_token_keys(capsys):
    cache_keys.main(["--prompt-len", "70", "--gen-len", "3", "--batch", "2", "--repeat", "1", "--threads", "1"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    table = {cells[0].strip(): [float(c) for c in cells[1:]] for cells in rows}
    assert set(table) == set(cache_keys.VARIANTS)
    assert table["c4 token keys"][-1] == 1 and all(r[0] > 0 for r in table.values())
