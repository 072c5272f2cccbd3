"""The benchmark's pure logic: roofline formulas, run order, aggregation, ratios, thrash detection, plans."""

from __future__ import annotations

import json
import math
import os

import pytest

from engine.bench.checkpoints import checkpoint_param_count, module_bytes, tensor_sizes
from engine.bench.child import accelerate_device_map
from engine.bench.isolation import MemoryCgroup, create_memory_cgroup, parse_oom_kills, run_child
from engine.bench.offload import build_parser, compression_plan, offload_plan, resolve_defaults
from engine.bench.report import (
    RunConfig,
    RunRecord,
    aggregate,
    best_row,
    expected_disk_read,
    interleave,
    is_thrashing,
    ratio,
)
from engine.bench.roofline import compute_bound_tokens_per_s, disk_bound_tokens_per_s
from engine.errors import UserError
from engine.markdown import markdown_table
from engine.storage.host_memory import cgroup_room, own_cgroup_path


def test_compute_bound_matches_the_formula_and_ignores_batch():
    # OPT-1.3B at 100 GFLOP/s, prompt 128, gen 16: 16 * 1e11 / (2 * 1.3e9 * 144) = 4.27 tok/s
    assert compute_bound_tokens_per_s(1e11, 1_300_000_000, 128, 16) == pytest.approx(4.2735, rel=1e-4)
    # twice the FLOP/s doubles it; a longer prompt (more prefill work per generated token) lowers it
    assert compute_bound_tokens_per_s(2e11, 10**9, 128, 16) == pytest.approx(
        2 * compute_bound_tokens_per_s(1e11, 10**9, 128, 16))
    assert compute_bound_tokens_per_s(1e11, 10**9, 512, 16) < compute_bound_tokens_per_s(1e11, 10**9, 128, 16)


def test_disk_bound_scales_with_batch_and_bandwidth():
    # 2 GB/s, 2.4 GB read per forward pass, 8 rows, 16 steps: 8 tokens every 1.2 s
    assert disk_bound_tokens_per_s(2e9, 16 * 2.4e9, 16 * 8) == pytest.approx(8 / 1.2)
    # 8x the rows for the same reads: 8x the bound
    at_8 = disk_bound_tokens_per_s(2e9, 16 * 2.4e9, 16 * 8)
    assert disk_bound_tokens_per_s(2e9, 16 * 2.4e9, 16 * 64) == pytest.approx(8 * at_8)
    assert math.isinf(disk_bound_tokens_per_s(2e9, 0, 8))


def _cfg(key, system="hf", batch=1, cap=None, tags=()):
    return RunConfig(key, key, system, batch, cap, tags=tags)


def _rec(key, repeat, tps, status="ok", read=10**9, result=None):
    res = {"tokens_per_s": tps, "batch": 1, "read_after_import": 10**8, "system_disk_read_bytes": 0}
    res.update(result or {})
    return RunRecord(key, repeat, status, 1.0, 2**30, read, None, "drop_caches",
                     res if status == "ok" else {})


def test_interleave_runs_every_config_once_per_repeat_in_order():
    a, b, c = _cfg("a"), _cfg("b"), _cfg("c")
    assert [(r, x.key) for r, x in interleave([a, b, c], 2)] == [
        (0, "a"), (0, "b"), (0, "c"), (1, "a"), (1, "b"), (1, "c")]


def test_rows_take_the_median_of_finished_repeats_and_ratios_compare_medians():
    hf, acc = _cfg("hf"), _cfg("acc", "accelerate", cap=3 * 2**30)
    records = [_rec("hf", 0, 2.0), _rec("hf", 1, 4.0), _rec("hf", 2, 3.5),
               _rec("acc", 0, 1.0), _rec("acc", 1, None, status="timeout"), _rec("acc", 2, 0.5)]
    rows = aggregate([hf, acc], records)
    assert rows[0].tokens_per_s == 3.5
    assert rows[1].tokens_per_s == 0.75  # the timed-out repeat does not count
    assert ratio(rows[0], rows[1]) == pytest.approx(3.5 / 0.75)
    assert rows[1].status(checkpoint_bytes=10**9) == "1/3 timeout"
    assert rows[0].status(checkpoint_bytes=10**9) == "ok"
    assert best_row(rows, lambda r: True) is rows[0]
    assert best_row(rows, lambda r: r.config.system == "engine") is None
    assert ratio(rows[0], None) is None


def test_a_row_without_any_finished_repeat_has_no_throughput_or_ratio_and_says_why():
    failed = _rec("y", 0, None, status="error")
    failed.result = {"error": "UserError: gpu needs 2.7 GiB > budget 2.0 GiB"}
    rows = aggregate([_cfg("x"), _cfg("y")], [_rec("x", 0, None, status="oom"), failed])
    assert rows[0].tokens_per_s is None and ratio(rows[0], rows[0]) is None
    assert rows[0].status(0) == "1/1 oom"
    assert rows[1].status(0) == "1/1 error, UserError: gpu needs 2.7 GiB > budget 2.0 GiB"


def test_thrashing_is_reads_far_above_what_the_run_needs():
    result = {"read_after_import": 300 * 10**6, "system_disk_read_bytes": 38 * 10**9}
    needed = expected_disk_read(result, checkpoint_bytes=2_600_000_000)
    assert needed == 300 * 10**6 + 2_600_000_000 + 38 * 10**9
    assert not is_thrashing(needed, needed)
    assert not is_thrashing(int(1.5 * needed), needed)
    assert is_thrashing(3 * needed, needed)
    assert not is_thrashing(10**12, None)  # a killed run's need is unknown: no verdict
    rows = aggregate([_cfg("x")], [_rec("x", 0, 1.0, read=3 * needed, result=result)])
    assert "THRASHING in 1/1" in rows[0].status(2_600_000_000)


def test_markdown_table_has_a_separator_and_one_line_per_row():
    text = markdown_table(["a", "b"], [["1", "2"], ["3", "4"]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |", "| 3 | 4 |"]


def test_oom_counter_and_own_cgroup_are_parsed_from_kernel_text():
    assert parse_oom_kills("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n") == 3
    assert parse_oom_kills("low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n") == 1
    v1 = "9:name=systemd:/\n4:memory:/process_api/abc\n0::/\n"
    assert own_cgroup_path(v1, "v1") == "process_api/abc"
    assert own_cgroup_path("0::/user.slice/session-1.scope\n", "v2") == "user.slice/session-1.scope"


def test_without_a_memory_hierarchy_the_cgroup_falls_back_and_says_so(tmp_path):
    group = create_memory_cgroup("x", root=tmp_path)
    assert group.path is None and group.version == "none" and "NO memory cap" in group.note
    group.set_limit(2**30)  # a no-op, not an error
    assert group.peak_bytes() is None and group.oom_kills() == 0


def test_v1_limits_are_written_as_the_kernel_expects(tmp_path):
    group = MemoryCgroup(tmp_path, "v1", "test")
    group.set_limit(3 * 2**30)
    assert (tmp_path / "memory.limit_in_bytes").read_text() == str(3 * 2**30)
    group.set_limit(None)
    assert (tmp_path / "memory.limit_in_bytes").read_text() == "-1"
    v2 = MemoryCgroup(tmp_path, "v2", "test")
    v2.set_limit(None)
    assert (tmp_path / "memory.max").read_text() == "max"


def test_checkpoint_sizes_come_from_safetensors_headers(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    save_file({"model.decoder.layers.0.fc1.weight": torch.zeros(4, 8, dtype=torch.float16),
               "model.decoder.layers.10.fc1.weight": torch.zeros(2, 8, dtype=torch.float16),
               "model.decoder.embed_tokens.weight": torch.zeros(16, 8, dtype=torch.float32)},
              str(tmp_path / "model.safetensors"))
    sizes = tensor_sizes(tmp_path)
    assert sizes["model.decoder.embed_tokens.weight"] == (128, 512)
    assert checkpoint_param_count(tmp_path) == 32 + 16 + 128
    # "layers.1" must not match "layers.10"
    assert module_bytes(tmp_path, ["model.decoder.layers.0"]) == 64
    assert module_bytes(tmp_path, ["model.decoder.layers.1"]) == 0


def test_accelerate_offloads_every_decoder_layer_and_keeps_the_rest_in_ram():
    device_map = accelerate_device_map(3)
    on_disk = [k for k, v in device_map.items() if v == "disk"]
    assert on_disk == [f"model.decoder.layers.{i}" for i in range(3)]
    assert device_map["lm_head"] == "cpu" and device_map["model.decoder.embed_tokens"] == "cpu"


def _args(*argv):
    args = build_parser().parse_args(list(argv))
    resolve_defaults(args)
    return args


def test_offload_plan_runs_peers_at_each_batch_and_the_engine_capped_with_ablations(tmp_path):
    args = _args("--policy", "manual", "--percent", "0", "50", "100", "0", "100", "0",
                 "--gpu-batch-size", "8", "--num-gpu-batches", "4", "--threads", "2")
    assert (args.prompt_len, args.gen_len, args.batches) == (128, 16, [1, 8])
    plan = {c.key: c for c in offload_plan(args, tmp_path)}
    assert plan["hf/ram/B8"].cap_bytes is None
    assert plan["accelerate/cap/B1"].cap_bytes == 3 * 2**30
    assert plan["engine/ram/B8"].policy["w_gpu_percent"] == 100 and plan["engine/ram/B8"].cap_bytes is None
    best = plan["engine/cap/best"]
    assert best.batch == 32 and best.policy["w_cpu_percent"] == 50 and best.policy["storage_dtype"] == "fp16"
    assert best.gpu_mem == best.cpu_mem == 2 * 2**30  # the 3 GiB cap less the 1 GiB reserve
    assert plan["engine/cap/no-overlap"].policy["overlap"] is False
    assert plan["engine/cap/ngb1"].policy["num_gpu_batches"] == 1


def test_the_num_gpu_batches_ablation_is_skipped_when_it_would_repeat_the_best_run(tmp_path):
    args = _args("--policy", "manual", "--num-gpu-batches", "1", "--systems", "engine")
    keys = [c.key for c in offload_plan(args, tmp_path)]
    assert "engine/cap/ngb1" not in keys and "engine/cap/no-overlap" in keys
    assert not any(k.startswith(("hf", "accelerate", "engine/ram")) for k in keys)


def test_compression_plan_pairs_compressed_and_uncompressed_weights_on_disk_with_direct_io():
    args = _args("--workload", "compression")
    assert (args.prompt_len, args.gen_len, args.batches) == (32, 64, [8, 32, 64])
    plan = compression_plan(args)
    variants = ["uncompressed", "compressed-dim0", "compressed-dim1"]
    assert [(c.batch, c.tags[0]) for c in plan] == [(b, v) for b in (8, 32, 64) for v in variants]
    for c in plan:
        assert c.policy["direct_io"] and c.policy["w_gpu_percent"] == 0 and c.policy["w_cpu_percent"] == 0
        assert c.policy["compress_weight"] == (c.tags[0] != "uncompressed") and c.cap_bytes == 3 * 2**30
        assert c.tags[0] == "uncompressed" or c.tags[0] == f"compressed-dim{c.policy['comp_weight_dim']}"
    json.dumps([c.policy for c in plan])  # specs travel to the child as JSON


def test_bad_options_are_one_line_user_errors():
    with pytest.raises(UserError, match="unknown"):
        _args("--systems", "hf,vllm")
    with pytest.raises(UserError, match="positive"):
        _args("--batches", "0,8")


def test_a_child_that_overruns_its_timeout_is_killed_and_reported(tmp_path):
    none = MemoryCgroup(None, "none", "test")
    cpu = max(os.sched_getaffinity(0))  # one we may use: CPU 0 need not be, and pinning to the last one shows
    out = run_child(["sleep", "60"], env={}, cpus={cpu}, cgroup=none, limit_bytes=None, timeout_s=0.3,
                    log_path=tmp_path / "log")
    assert out.timed_out and out.returncode == -9  # SIGKILLed: left alone, sleep would exit 0
    ok = run_child(["grep", "Cpus_allowed_list", "/proc/self/status"], env={}, cpus={cpu}, cgroup=none,
                   limit_bytes=None, timeout_s=30, log_path=tmp_path / "log")
    assert not ok.timed_out and ok.returncode == 0 and ok.max_rss_bytes > 0
    assert (tmp_path / "log").read_text().split() == ["Cpus_allowed_list:", str(cpu)]  # pinned as asked


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cgroup_room_is_the_tightest_limit_of_our_group_and_its_ancestors(tmp_path, version):
    """Budgets default to this room, so a capped container or benchmark child is never over-promised."""
    v2 = version == "v2"
    base = tmp_path if v2 else tmp_path / "memory"
    names = ("memory.max", "memory.current", "file") if v2 else ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                                                   "cache")
    if v2:
        (tmp_path / "cgroup.controllers").write_text("memory\n")
    groups = {"": ("max" if v2 else str(2**63 - 4096), 10 << 30, 0), "outer": (8 << 30, 5 << 30, 1 << 30),
              "outer/inner": (3 << 30, 2 << 30, 256 << 20)}
    for rel, (limit, usage, cache) in groups.items():
        group = base / rel
        group.mkdir(parents=True, exist_ok=True)
        (group / names[0]).write_text(f"{limit}\n")
        (group / names[1]).write_text(f"{usage}\n")
        (group / "memory.stat").write_text(f"anon 1\n{names[2]} {cache}\n")
    proc = "0::/outer/inner\n" if v2 else "4:memory:/outer/inner\n"
    # inner: 3 GiB - 2 GiB + 256 MiB of reclaimable cache; outer: 8 - 5 + 1 GiB
    assert cgroup_room(tmp_path, proc) == (1 << 30) + (256 << 20)
    (base / "outer/inner" / names[0]).write_text("max\n" if v2 else f"{2**63 - 4096}\n")
    assert cgroup_room(tmp_path, proc) == 4 << 30
    assert cgroup_room(tmp_path / "absent", proc) is None
