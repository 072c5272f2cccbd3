"""harness.sweep: one row per effective batch size, figures taken from the engine's own stats."""

from __future__ import annotations

import pandas as pd
import pytest

from engine.errors import UserError
from engine.policy import Policy
from harness import sweep


def test_sweep_rows_and_merge(tiny_models, tmp_path):
    policy = Policy(num_gpu_batches=2)
    table = sweep.sweep(str(tiny_models["opt"]), None, policy, [2, 4], prompt_len=6, gen_len=3, load_kwargs={})
    assert table["effective_batch"].tolist() == [2, 4]
    assert table["gpu_batch_size"].tolist() == [1, 2] and set(table["num_gpu_batches"]) == {2}
    # a random tiny model can stop early at EOS, but never generates more than asked
    assert (table["generated_tokens"] <= table["effective_batch"] * 3).all() and (table["generated_tokens"] > 0).all()
    seconds = table["prefill_s"] + table["decode_s"]
    assert table["tokens_per_s"].tolist() == pytest.approx((table["generated_tokens"] / seconds).tolist())
    assert (table["peak_gpu_bytes"] > 0).all() and set(table["compression"]) == {"none"}

    csv = tmp_path / "sweep.csv"
    sweep.merge_into(csv, table)
    rerun = table.assign(tokens_per_s=table["tokens_per_s"] * 2).iloc[:1]
    merged = sweep.merge_into(csv, rerun)
    assert len(merged) == 2  # the rerun point replaced the old one
    assert pd.read_csv(csv).set_index("effective_batch").loc[2, "tokens_per_s"] == pytest.approx(
        2 * table["tokens_per_s"].iloc[0])


def test_batch_sizes_must_fill_whole_gpu_batches():
    with pytest.raises(UserError, match="not multiples of --num-gpu-batches 4"):
        sweep.sweep("opt-125m", "dummy", Policy(num_gpu_batches=4), [2, 8], 4, 2, {})
