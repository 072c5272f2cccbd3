"""Engine.plan: what loading and generating will take per tier, known before anything is allocated.

The plan and the engine share one layout (engine.memory), so what `load` books must be what the plan
said, tier by tier; the planner's cost model must agree with it; and `python -m engine.generate --plan`
must say yes (exit 0, a table) or no (exit 1, one line) without a GPU and without touching memory or disk.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest

from engine import Engine, Policy, UserError
from engine.bench.reference import POLICIES
from engine.config import named_config
from engine.models.registry import adapter_for
from engine.placement import place_layer_weights
from engine.planner.cost_model import peak_memory
from engine.planner.measure import load_hardware
from engine.planner.search import search_policy
from engine.policy import TIERS

PAPER_30B = Policy(gpu_batch_size=48, num_gpu_batches=3, cpu_cache_compute=True).with_percent(20, 80, 0, 100, 0, 100)
PAPER_ARGS = ["--model", "opt-30b", "--weights", "dummy", "--plan", "--prompt-len", "512", "--max-new-tokens", "32",
              "--percent", "20", "80", "0", "100", "0", "100", "--gpu-batch-size", "48", "--num-gpu-batches", "3",
              "--cpu-cache-compute", "--gpu-mem", "16GiB", "--cpu-mem", "200GiB"]
PLANNED = {name: POLICIES[name] for name in ("all-gpu", "weights-30-30-40", "weights-disk-direct", "cache-cpu-compute",
                                             "three-gpu-batches", "no-overlap")}
PLANNED["compressed"] = dataclasses.replace(POLICIES["weights-30-30-40"], compress_weight=True, compress_cache=True,
                                            comp_weight_group=16, comp_cache_group=8)
PROMPT, NEW = 9, 3


def _generate(cli_args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.generate", *cli_args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("policy", PLANNED.values(), ids=PLANNED.keys())
@pytest.mark.parametrize("device", ["cpu", "cpu:0"])
def test_load_books_what_the_plan_said_on_every_tier(tiny_models, tmp_path, policy, device):
    """Weights and buffers as load books them; the KV cache and activations as a full block books them."""
    folder = tiny_models["opt"]
    plan = Engine.plan(folder, policy, device=device, offload_dir=tmp_path, prompt_len=PROMPT, gen_len=NEW)
    with Engine.load(folder, policy=policy, device=device, offload_dir=tmp_path) as eng:
        loaded = eng.held_bytes
        assert loaded == {t: plan.bytes["weights"][t] + plan.bytes["buffers"][t] for t in TIERS}
        eng.generate([[5 + i] * PROMPT for i in range(policy.block_size)], max_new_tokens=NEW)
        booked = {t: eng.stats.peak_bytes[t] - loaded[t] for t in TIERS}
    assert booked == {t: plan.bytes["cache"][t] + plan.bytes["activations"][t] for t in TIERS}
    assert all(plan.bytes["transient"][t] >= 0 for t in TIERS) and plan.fits


def test_planning_allocates_nothing_and_makes_no_folder(tmp_path, monkeypatch):
    """OPT-175B's 350 GB of weights on a GPU this machine lacks: planned from shapes alone."""
    def refuse(*args, **kwargs):
        raise AssertionError("a plan must not make tiers, stores or buffers")

    for name in ("engine.api.make_tiers", "engine.storage.tiers.MemoryStore.__init__",
                 "engine.storage.tiers.DiskStore.__init__", "engine.runtime.allocate_buffers"):
        monkeypatch.setattr(name, refuse)
    offload = tmp_path / "nvme" / "offload"
    plan = Engine.plan("opt-175b", Policy(gpu_batch_size=32, num_gpu_batches=8).with_percent(0, 50, 0, 0, 0, 100),
                       weights="dummy", device="cuda", gpu_mem="16GiB", cpu_mem="200GiB", disk_mem="1.5TB",
                       offload_dir=offload, prompt_len=512, gen_len=32)
    assert plan.device == "cuda:0" and plan.fits
    assert sum(plan.bytes["weights"].values()) > 300e9
    assert not (tmp_path / "nvme").exists()


def test_a_gpu_plan_without_a_gpu_needs_its_budget():
    with pytest.raises(UserError, match="gpu_mem"):
        Engine.plan("opt-125m", weights="dummy", device="cuda", prompt_len=8, gen_len=2)


def test_the_paper_policy_for_opt_30b_fits_16_gib_and_agrees_with_the_cost_model():
    plan = Engine.plan("opt-30b", PAPER_30B, weights="dummy", device="cuda", gpu_mem="16GiB", cpu_mem="200GiB",
                       prompt_len=512, gen_len=32)
    assert plan.fits and plan.peak["gpu"] <= 16 * 2**30
    model = peak_memory(named_config("opt-30b"), PAPER_30B, 512, 32, "cuda")
    for tier in ("gpu", "cpu"):
        assert abs(plan.peak[tier] / model[tier] - 1) <= 0.10, (tier, plan.peak, model)


def test_the_engine_accepts_the_policy_the_search_prints():
    t4 = load_hardware("t4-paper")
    for model, prompt in (("opt-30b", 512), ("opt-6.7b", 1024)):
        found = search_policy(named_config(model), t4, prompt_len=prompt, gen_len=32)
        plan = Engine.plan(model, found.policy, weights="dummy", device="cuda", gpu_mem=t4.gpu_mem,
                           cpu_mem=t4.cpu_mem, disk_mem=t4.disk_mem, prompt_len=prompt, gen_len=32)
        assert plan.fits, plan.shortfall


def test_the_search_never_picks_what_the_engine_refuses_on_a_small_cpu_box():
    """The bench's quick setup: OPT-125m, fp16 storage, 2 GiB budgets for both tiers of one host."""
    local = dataclasses.replace(load_hardware("t4-paper"), name="cpu-box", device="cpu")
    base = Policy(storage_dtype="fp16")
    found = search_policy(named_config("opt-125m"), local, prompt_len=32, gen_len=8, gpu_mem=2 << 30,
                          cpu_mem=2 << 30, base=base)
    plan = Engine.plan("opt-125m", found.policy, weights="dummy", device="cpu", gpu_mem=2 << 30, cpu_mem=2 << 30,
                       prompt_len=32, gen_len=8)
    assert plan.host_peak <= 2 << 30 and plan.fits, (found.policy.label(), plan.table())


@pytest.mark.parametrize("wg,wc", [(20, 80), (30, 70), (30, 30), (0, 50), (4, 96), (100, 0)])
def test_a_tier_never_gets_more_of_a_layer_than_its_share(wg, wc):
    """The gpu tier within its share, the gpu and cpu tiers together within theirs; FlexGen's GPU set at 20%."""
    cfg = named_config("opt-30b")
    policy = Policy().with_percent(wg, wc, 100, 0, 100, 0)
    for spec in adapter_for(cfg).layer_specs(cfg):
        sizes = {n: 2 * math.prod(s) for n, s in spec.shapes.items()}
        where = place_layer_weights(sizes, policy)
        held = {t: sum(sizes[n] for n in sizes if where[n] == t) for t in TIERS}
        total = sum(sizes.values())
        assert held["gpu"] <= wg / 100 * total * (1 + 1e-9)
        assert held["gpu"] + held["cpu"] <= (wg + wc) / 100 * total * (1 + 1e-9)
        if wg + wc == 100:
            assert held["disk"] == 0
        if spec.kind == "decoder" and wg == 20:
            assert {n for n in sizes if where[n] == "gpu" and len(spec.shapes[n]) == 2} == {"o.w"}


def test_cli_plan_fits_prints_the_table_and_exits_0():
    proc = _generate(PAPER_ARGS)
    assert proc.returncode == 0, proc.stderr
    assert "opt-30b on cuda:0" in proc.stdout and "| peak |" in proc.stdout
    data = json.loads(_generate([*PAPER_ARGS, "--json"]).stdout)
    assert data["fits"] and data["peak"]["gpu"] <= 16 * 2**30 and data["device"] == "cuda:0"


def test_cli_plan_that_does_not_fit_says_why_in_one_line_and_exits_1():
    proc = _generate([*PAPER_ARGS[:-4], "--gpu-mem", "8GiB", "--cpu-mem", "200GiB", "--json"])
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: opt-30b does not fit: gpu needs "), proc.stderr
    assert "> budget 8.0 GiB" in lines[0]
