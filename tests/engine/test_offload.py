"""Issue 3: every placement policy gives HF's outputs; budgets are refused up front; files are cleaned."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.paths import HELM_DATA
from helpers.reference import assert_matches_hf
from transformers import AutoTokenizer

from engine import Engine, Policy, UserError
from engine.api import plan_blocks
from engine.bench.reference import POLICIES
from engine.storage.tiers import DiskStore

MIXED = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28], [40, 41, 42, 43]]


# Every policy on the default device (cuda where present); then the CPU spelled out as a user may spell it,
# over the policies whose tiers differ most: weights three ways, cpu-tier attention, GPU batches, no overlap.
SPELLED = ("all-gpu", "weights-30-30-40", "cache-cpu-compute", "three-gpu-batches", "no-overlap")
MATRIX = ([pytest.param(policy, None, id=name) for name, policy in POLICIES.items()]
          + [pytest.param(POLICIES[name], device, id=f"{name}-{device}") for name in SPELLED
             for device in ("cpu", "cpu:0")])


@pytest.mark.parametrize("policy,device", MATRIX)
@pytest.mark.parametrize("name", ["opt", "llama"])
def test_tiny_models_match_hf_under_every_policy(tiny_models, hf_model, tmp_path, name, policy, device):
    with Engine.load(tiny_models[name], policy=policy, device=device, offload_dir=tmp_path) as eng:
        assert_matches_hf(eng, hf_model(tiny_models[name]), MIXED, max_new=5, echo=True)
        if policy.split("weight")["disk"] > 0:
            assert eng.stats.bytes_read["disk"] > 0


@pytest.mark.parametrize("policy", POLICIES.values(), ids=POLICIES.keys())
def test_smollm2_matches_hf_under_every_policy(smollm2, hf_model, tmp_path, policy):
    with Engine.load(smollm2, policy=policy, offload_dir=tmp_path) as eng:
        prompts = [eng.tokenizer(t).input_ids for t in ["Paris is the capital of", "1, 2, 3,", "Hi"]]
        assert_matches_hf(eng, hf_model(smollm2), prompts, max_new=4)


@pytest.mark.parametrize("direct_io", [False, True], ids=["buffered", "direct"])
def test_weights_on_disk_are_read_once_per_block_step(tiny_models, tmp_path, direct_io):
    """Each weight is read once per forward pass of a block, except embedding tables: a lookup reads
    only the rows it needs, far less than the table. Host staging holds one layer's reads, two where a
    worker reads the next layer ahead (direct reads)."""
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, direct_io=direct_io).with_percent(0, 0, 100, 0, 100, 0)
    with Engine.load(tiny_models["opt"], policy=policy, offload_dir=tmp_path) as eng:
        weights = eng.held_bytes["disk"]
        embed, spec = eng._rt.weights[0], eng._rt.specs[0]
        tables = {n: sw.codec for n, sw in embed.items() if n in spec.tables}
        eng.generate(MIXED, max_new_tokens=3)  # one block of 4 rows (2 GPU batches), 3 forward passes
        lookups = eng.stats.bytes_read["disk"] - 3 * (weights - sum(c.nbytes for c in tables.values()))
        # at most every id of every pass: prefill 2 batches x 2 rows x 9 padded slots, then 2 x 4 new tokens
        most = (2 * 2 * 9 + 2 * 4) * sum(c.stored_row_bytes for c in tables.values())
        assert 0 < lookups <= most < min(c.nbytes for c in tables.values())
        assert eng.stats.peak_bytes["disk"] == weights
        layer_staging = max(sum(DiskStore.staging_bytes(sw.codec.nbytes) for n, sw in layer.items()
                                if not (spec.kind == "embed" and n in spec.tables))
                            for layer, spec in zip(eng._rt.weights, eng._rt.specs, strict=True))
        assert eng.held_bytes["cpu"] == (2 if direct_io else 1) * layer_staging


def test_budget_refused_up_front_for_opt_175b():
    with pytest.raises(UserError, match=r"gpu needs .* GiB > budget 1.0 GiB"):
        Engine.load("opt-175b", weights="dummy", gpu_mem="1GiB")


def test_cli_budget_error_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "engine.generate", "--model", "opt-175b", "--weights", "dummy",
                           "--prompt", "hi", "--gpu-mem", "1GiB"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "budget" in lines[0]


def test_block_memory_checked_before_running(tiny_models, tmp_path):
    with Engine.load(tiny_models["opt"], gpu_mem="2MiB", offload_dir=tmp_path) as eng:
        with pytest.raises(UserError, match="KV cache and activations"):
            eng.generate([[1] * 100] * 8, max_new_tokens=20)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gpu tier is host memory only without a GPU")
def test_gpu_and_cpu_tiers_share_host_memory_without_a_gpu(tiny_models, tmp_path, monkeypatch):
    """Each budget alone fits, but both tiers are the same RAM: the plan is refused, not OOM-killed."""
    policy = Policy().with_percent(50, 50, 100, 0, 100, 0)
    with Engine.load(tiny_models["opt"], policy=policy, offload_dir=tmp_path) as eng:
        need = eng.held_bytes["gpu"] + eng.held_bytes["cpu"]
    monkeypatch.setattr("engine.memory.available_ram", lambda: need - 1)
    with pytest.raises(UserError, match=r"gpu \+ cpu tiers \(both host memory here\) need .* available"):
        Engine.load(tiny_models["opt"], policy=policy, offload_dir=tmp_path, gpu_mem="1GiB", cpu_mem="1GiB")


def test_offload_files_removed_and_stale_folders_cleaned(tiny_models, tmp_path):
    stale = tmp_path / "flexhelm-999999-abc"  # a killed run's folder: its pid does not exist
    stale.mkdir()
    (stale / "x.bin").write_bytes(b"0" * 10)
    eng = Engine.load(tiny_models["opt"], policy=Policy().with_percent(0, 0, 50, 0, 50, 0), offload_dir=tmp_path)
    assert not stale.exists()
    folder = eng.offload_folder
    assert any(folder.iterdir())
    eng.close()
    assert not folder.exists()
    # a process that exits without closing leaves nothing behind either
    code = (f"from engine import Engine, Policy; Engine.load({str(tiny_models['opt'])!r}, "
            f"policy=Policy().with_percent(0,0,100,0,100,0), offload_dir={str(tmp_path)!r})")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert not list(tmp_path.glob("flexhelm-*"))


def test_policy_validation_messages():
    for bad, pattern in [(dict(w_gpu_percent=70, w_cpu_percent=40), "sum to 110"),
                         (dict(cache_cpu_percent=-1), r"\[0, 100\]"), (dict(gpu_batch_size=0), "positive")]:
        with pytest.raises(UserError, match=pattern):
            Policy(**bad)


@pytest.mark.skipif(not HELM_DATA.is_dir(), reason="../shared/data/helm-scenarios is not beside this checkout")
def test_padding_efficiency_on_mmlu_prompts(smollm2):
    tok = AutoTokenizer.from_pretrained(smollm2)
    prompts = []
    for path in sorted(Path(HELM_DATA / "mmlu" / "data" / "test").glob("*.csv"))[:20]:
        with open(path, newline="") as f:
            for row in csv.reader(f):
                prompts.append(f"{row[0]}\nA. {row[1]}\nB. {row[2]}\nC. {row[3]}\nD. {row[4]}\nAnswer:")
    lengths = [len(ids) for ids in tok(prompts).input_ids]
    blocks = plan_blocks(lengths, Policy(gpu_batch_size=8, num_gpu_batches=4))
    padded = sum(len(b) * max(lengths[i] for i in b) for block in blocks for b in block)
    assert sum(lengths) / padded >= 0.9


def test_no_stray_files_in_cwd():
    assert not list(Path(os.getcwd()).glob("flexhelm-*"))


@pytest.mark.parametrize("opt_in", [False, True])
def test_glibc_threshold_is_set_only_when_the_policy_asks(tiny_models, monkeypatch, opt_in):
    """The mmap threshold is the whole process's (it slows HF in the same process): Engine.load leaves it
    alone unless `Policy.return_freed_memory` asks, as the memory-bound benchmarks do."""
    from engine import memory
    calls = []
    monkeypatch.setattr(memory, "return_freed_memory", lambda: calls.append(1) or True)
    with Engine.load(tiny_models["opt"], policy=Policy(return_freed_memory=opt_in), device="cpu"):
        assert len(calls) == int(opt_in)
