"""Cost model, hardware profiles and policy search: the paper's table, the LP's optimality, capacities."""

from __future__ import annotations

import dataclasses
import json
import random
import re

import pytest

from engine.bench.cost_validation import PAPER_ROWS, paper_table, predict_rows
from engine.config import named_config
from engine.errors import UserError
from engine.planner.cost_model import compressed_nbytes, peak_memory, predict
from engine.planner.hardware import (
    HardwareProfile,
    parse_rate,
    preset_names,
    read_profile,
    write_profile,
)
from engine.planner.measure import load_hardware
from engine.planner.search import MEMORY_MARGIN, capacities, search_policy
from engine.policy import TIERS, Policy
from engine.search import main


@pytest.fixture(scope="module")
def t4() -> HardwareProfile:
    return load_hardware("t4-paper")


@pytest.fixture(scope="module")
def table(t4) -> list[dict]:
    return paper_table(t4)


def test_paper_policies_predicted_within_25_percent(table):
    assert len(table) == len(PAPER_ROWS) == 8
    for row in table:
        assert abs(row["error"]) <= 0.25, row


def test_searched_policy_predicts_at_least_the_paper_policy(table):
    for row in table:
        assert row["searched tok/s"] >= row["predicted tok/s"] * (1 - 1e-6), row


def _fits(peak: dict[str, int], capacity: dict[str, int], hw: HardwareProfile) -> bool:
    usable = {t: capacity[t] * (1 - MEMORY_MARGIN) for t in TIERS}
    shared = not hw.shared_host_memory or peak["gpu"] + peak["cpu"] <= usable["cpu"]
    return shared and all(peak[t] <= usable[t] for t in TIERS)


def test_paper_policies_fit_the_t4_with_the_margin(t4):
    for row in PAPER_ROWS:
        peak = peak_memory(named_config(row.model), row.policy(), row.prompt_len, 32)
        assert _fits(peak, capacities(t4), t4), (row, peak)


def test_lp_placement_beats_every_sampled_feasible_placement(t4):
    """The LP's optimum is no slower than any of many random placements that fit the same budgets."""
    cfg = named_config("opt-30b")
    cap = dict(gpu=16 << 30, cpu=100 << 30, disk=2 << 40)
    result = search_policy(cfg, t4, prompt_len=256, gen_len=16, gpu_mem=cap["gpu"], cpu_mem=cap["cpu"],
                           disk_mem=cap["disk"])
    assert _fits(result.peak_bytes, cap, t4)
    best = result.policy
    rng, tried = random.Random(0), 0
    for _ in range(400):
        pct = []
        for gpu_cap in (30, 30, 100):  # weights, cache, activations; most mostly-on-gpu draws would not fit
            g = rng.uniform(0, gpu_cap)
            pct += [g, rng.uniform(0, 100 - g)]
        trial = best.with_percent(*pct)
        if not _fits(peak_memory(cfg, trial, 256, 16), cap, t4):
            continue
        tried += 1
        assert predict(cfg, t4, trial, 256, 16).throughput_tok_s <= result.throughput_tok_s * 1.002
    assert tried > 20


def test_search_respects_budgets_and_prefers_the_device_when_it_fits(t4):
    small = search_policy(named_config("opt-1.3b"), t4, prompt_len=128, gen_len=8, max_block_size=64)
    assert small.policy.w_gpu_percent == 100 and small.policy.cache_gpu_percent == 100
    tight = search_policy(named_config("opt-6.7b"), t4, prompt_len=128, gen_len=8, gpu_mem=4 << 30,
                          max_block_size=64)
    assert tight.policy.w_gpu_percent < 40
    assert _fits(tight.peak_bytes, capacities(t4, gpu_mem=4 << 30), t4)
    assert tight.throughput_tok_s < small.throughput_tok_s


def test_block_size_cap_is_respected(t4):
    result = search_policy(named_config("opt-6.7b"), t4, prompt_len=64, gen_len=8, max_block_size=12)
    assert result.policy.block_size <= 12


def test_shared_host_memory_counts_both_memory_tiers_against_ram(t4):
    cpu_box = dataclasses.replace(t4, name="cpu-box", device="cpu", gpu_mem=8 << 30, cpu_mem=8 << 30)
    result = search_policy(named_config("opt-1.3b"), cpu_box, prompt_len=64, gen_len=8, max_block_size=64)
    assert result.peak_bytes["gpu"] + result.peak_bytes["cpu"] <= (8 << 30) * (1 - MEMORY_MARGIN)


def test_infeasible_model_names_the_shortfall_in_bytes(t4):
    cfg = named_config("opt-175b")
    with pytest.raises(UserError) as err:
        search_policy(cfg, t4, prompt_len=512, gen_len=32, gpu_mem=8 << 30, cpu_mem=64 << 30, disk_mem=100 << 30)
    short = int(re.search(r"short by (\d+) bytes", str(err.value)).group(1))
    weights = 175e9 * 2  # fp16, give or take embeddings
    usable = (8 + 64 + 100) * 2**30 * (1 - MEMORY_MARGIN)
    assert abs(short - (weights - usable)) / short < 0.05


def test_compression_shrinks_weights_to_about_0_5625_bytes():
    assert compressed_nbytes((4096,), 4, 64) == 4096 * 0.5625
    assert compressed_nbytes((1024, 4096), 4, 64, 0) == 1024 * 4096 * 0.5625
    cfg, plain = named_config("opt-30b"), Policy().with_percent(0, 100, 100, 0, 100, 0)  # host: weights only
    packed = dataclasses.replace(plain, compress_weight=True)
    ratio = peak_memory(cfg, packed, 512, 32)["cpu"] / peak_memory(cfg, plain, 512, 32)["cpu"]
    assert 0.5625 / 2 - 0.02 < ratio < 0.5625 / 2 + 0.03


def test_slower_disk_makes_disk_policies_slower_and_leaves_memory_policies_alone(t4):
    cfg = named_config("opt-6.7b")
    slow = dataclasses.replace(t4, dtoc_bw=t4.dtoc_bw / 4)
    on_disk = Policy(gpu_batch_size=8).with_percent(50, 0, 100, 0, 100, 0)
    in_ram = Policy(gpu_batch_size=8).with_percent(50, 50, 100, 0, 100, 0)
    assert predict(cfg, slow, on_disk, 128, 8).total_s > 2 * predict(cfg, t4, on_disk, 128, 8).total_s
    assert predict(cfg, slow, in_ram, 128, 8).total_s == predict(cfg, t4, in_ram, 128, 8).total_s


def test_partial_last_block_is_priced_as_a_smaller_block(t4):
    cfg, policy = named_config("opt-1.3b"), Policy(gpu_batch_size=8)  # decode streams weights: rows are cheap
    whole = predict(cfg, t4, policy, 64, 8)
    assert predict_rows(cfg, t4, policy, 8, 64, 8).throughput_tok_s == pytest.approx(whole.throughput_tok_s)
    assert predict_rows(cfg, t4, policy, 12, 64, 8).throughput_tok_s < whole.throughput_tok_s


def test_presets_load_and_round_trip(tmp_path):
    assert {"t4-paper", "a100-40gb", "a100-80gb", "h100-80gb", "h200"} <= set(preset_names())
    for name in preset_names():
        hw = load_hardware(name)
        path = tmp_path / f"{name}.json"
        write_profile(hw, path)
        again = read_profile(path)
        for field in dataclasses.fields(HardwareProfile):
            a, b = getattr(hw, field.name), getattr(again, field.name)
            assert a == pytest.approx(b, rel=1e-3) if isinstance(a, float) else a == b, field.name
    assert parse_rate("12.89GiB") == 12.89 * 2**30 and parse_rate("2GB/s") == 2e9


@pytest.mark.parametrize("content, message", [
    ("{", "not valid JSON"),
    ('{"name": "x"}', "missing fields"),
])
def test_bad_profiles_are_user_errors(tmp_path, content, message):
    path = tmp_path / "hw.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_hardware(str(path))
    with pytest.raises(UserError, match="unknown hardware"):
        load_hardware("t5-paper")


def test_cli_json_and_evaluate_policy(capsys, t4):
    main(["--model", "opt-30b", "--hardware", "t4-paper", "--prompt-len", "512", "--gen-len", "32", "--json"])
    searched = json.loads(capsys.readouterr().out)
    assert set(searched) == {"policy", "throughput_tok_s", "peak_bytes"}
    assert set(searched["peak_bytes"]) == set(TIERS)
    policy = Policy(**searched["policy"])
    assert predict(named_config("opt-30b"), t4, policy, 512, 32).throughput_tok_s == pytest.approx(
        searched["throughput_tok_s"])
    main(["--model", "opt-30b", "--hardware", "t4-paper", "--evaluate-policy", "--json", "--percent", "20", "80",
          "0", "100", "0", "100", "--gpu-batch-size", "48", "--num-gpu-batches", "3", "--cpu-cache-compute"])
    paper = json.loads(capsys.readouterr().out)
    assert paper["throughput_tok_s"] <= searched["throughput_tok_s"]
    assert paper["policy"]["gpu_batch_size"] == 48 and paper["policy"]["cpu_cache_compute"]
