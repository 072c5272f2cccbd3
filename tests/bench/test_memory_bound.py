"""The engine's plan bounds what a run really takes, and a benchmark row that runs out of memory fails the run."""

from __future__ import annotations

import pytest

from engine.bench.offload import failures
from engine.bench.offload_checks import Case, run_child
from engine.bench.report import RunRecord
from engine.policy import Policy

# Transients dominate: large GPU batches of a small model, the cache half on disk and attended on the host.
LARGE_BATCHES = Case("bound", "opt-125m",
                     Policy(gpu_batch_size=128, num_gpu_batches=2, cpu_cache_compute=True, storage_dtype="fp16",
                            return_freed_memory=True)
                     .with_percent(100, 0, 0, 50, 100, 0).to_dict(), 256, 48, 4, "2GiB", "2GiB", temperature=0.7)


def test_a_run_the_plan_accepts_stays_within_the_plan():
    """VmHWM of a fresh process, against its baseline (imports, a tokenizer) plus the plan's host peak."""
    r = run_child(LARGE_BATCHES.spec(threads=2))
    assert r["shortfall"] is None and r["stats"]["generated_tokens"] == 256 * 4
    assert r["vmhwm"] <= r["after_imports"] + r["plan"]["host_peak"], r


def _record(key: str, status: str) -> RunRecord:
    return RunRecord(key, 0, status, 1.0, 0, 0, None, "drop_caches", {})


@pytest.mark.parametrize("status", ["oom", "timeout", "crashed", "error"])
def test_a_row_that_did_not_finish_ok_fails_the_benchmark(status):
    records = [_record("hf/ram/B1", "ok"), _record("engine/cap/best", status)]
    line = failures(records)
    assert line == f"1 of 2 runs did not finish ok (engine/cap/best r0: {status})"
    assert failures(records[:1]) is None
