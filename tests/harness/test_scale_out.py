"""Scale-out (harness.scale_out): replicas on a local Ray cluster of 2 CPUs, and shards merged without Ray,
give the completions of the in-process run, compute every request exactly once, and refuse bad input in
one line. The smoke suite runs on a tiny random LLaMA in blocks of 2 rows (6 blocks of 9 requests)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from helpers.paths import HELM_DATA

from harness.helm.request_cache import REQUEST_CACHE_FILE
from harness.replicas import KILL_REPLICA_AFTER_BLOCKS_ENV
from harness.run import OFFLINE_ENV

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (HELM_DATA / "mmlu").is_dir(),
                                                   reason=f"offline HELM data not found at {HELM_DATA}")]
BLOCKS = ("--gpu-batch-size", "1", "--num-gpu-batches", "2")


def smoke_args(model: Path, output: Path) -> list[str]:
    return ["--suite", "smoke", "--model", str(model), "--data-dir", str(HELM_DATA), "--max-eval-instances", "3",
            *BLOCKS, "--output", str(output)]


def harness_run(*args: str) -> int:
    from harness.run import main

    return main(list(args))


def completions(output: Path) -> dict[str, list]:
    """Per run: every completion's text and token log-probs."""
    out = {}
    for run in sorted(p.parent for p in (output / "runs" / "smoke").glob("*/scenario_state.json")):
        states = json.loads((run / "scenario_state.json").read_text())["request_states"]
        out[run.name] = [[(c["text"], [t["logprob"] for t in c["tokens"]]) for c in s["result"]["completions"]]
                         for s in states]
    return out


def assert_same_completions(output: Path, reference: Path) -> None:
    got, want = completions(output), completions(reference)
    assert got.keys() == want.keys()
    for run in want:
        for g, w in zip(got[run], want[run], strict=True):
            assert [text for text, _ in g] == [text for text, _ in w], run
            for (_, glp), (_, wlp) in zip(g, w, strict=True):
                assert glp == pytest.approx(wlp, abs=1e-4)


def compute_counts(output: Path) -> list[int]:
    with sqlite3.connect(f"file:{output / REQUEST_CACHE_FILE}?mode=ro", uri=True) as db:
        return [n for (n,) in db.execute("SELECT computed FROM results")]


def engine_stats(output: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((output / "runs" / "smoke").glob("*/engine_stats.json"))]


@pytest.fixture(scope="module")
def in_process(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("in-process")
    assert harness_run(*smoke_args(tiny_llama, out)) == 0
    return out


@pytest.fixture(scope="module")
def ray_local():
    from harness.replicas import start_local

    ray = start_local(2, OFFLINE_ENV)
    yield ray
    ray.shutdown()


def test_two_replicas_give_the_in_process_completions(ray_local, in_process, tiny_llama, tmp_path):
    assert harness_run(*smoke_args(tiny_llama, tmp_path), "--workers", "2", "--threads-per-worker", "1") == 0
    assert_same_completions(tmp_path, in_process)
    counts = compute_counts(tmp_path)
    assert counts == [1] * len(compute_counts(in_process))
    stats = engine_stats(tmp_path)
    assert sum(s["computed_requests"] for s in stats) == len(counts)
    assert all(s["cached_requests"] == s["requests"] - s["computed_requests"] for s in stats)
    distributed = stats[0]["distributed"]
    assert distributed["mode"] == "ray" and distributed["replicas"] == 2
    assert all(r["blocks"] > 0 and r["tok_s"] > 0 for r in distributed["per_replica"])  # both replicas served
    assert all(s["generated_tokens_per_s"] for s in stats)  # throughput of the replicas, not of the cache
    assert (tmp_path / "report.md").is_file()
    from harness.replicas import host_memory

    load = json.loads((tmp_path / "manifest.json").read_text())["load_options"]
    assert int(load["cpu_mem"]) == host_memory(ray_local) // 2  # two replicas share this host's memory


def test_a_killed_replica_loses_and_repeats_no_request(ray_local, in_process, tiny_llama, tmp_path, monkeypatch):
    """After the first block is committed the driver `ray.kill`s a replica with a block in flight: that block
    goes to the other replica or the killed one's replacement, and nothing is computed twice."""
    monkeypatch.setenv(KILL_REPLICA_AFTER_BLOCKS_ENV, "1")
    assert harness_run(*smoke_args(tiny_llama, tmp_path), "--workers", "2") == 0
    assert compute_counts(tmp_path) == [1] * len(compute_counts(in_process))
    assert_same_completions(tmp_path, in_process)
    replicas = engine_stats(tmp_path)[0]["distributed"]["per_replica"]
    assert sum(r["restarts"] for r in replicas) == 1


def test_shards_merged_give_the_in_process_completions(in_process, tiny_llama, tmp_path, capsys):
    args = smoke_args(tiny_llama, tmp_path)
    assert harness_run(*args, "--shard", "0/2") == 0
    assert not list(tmp_path.glob("runs/*/*/run_spec.json"))  # a shard writes no runs
    with pytest.raises(SystemExit, match="1"):
        harness_run(*args, "--merge")
    assert "shard 1/2 has not finished" in capsys.readouterr().err
    assert harness_run(*args, "--shard", "1/2") == 0
    assert harness_run(*args, "--shard", "1/2") == 0  # a finished shard computes nothing again
    assert harness_run(*args, "--merge") == 0
    assert_same_completions(tmp_path, in_process)
    assert compute_counts(tmp_path) == [1] * len(compute_counts(in_process))
    distributed = engine_stats(tmp_path)[0]["distributed"]
    assert (distributed["mode"], distributed["replicas"]) == ("shards", 2)


@pytest.mark.parametrize(("flags", "message"), [
    (["--shard", "3/2"], "--shard '3/2' is not I/N with 0 <= I < N"),
    (["--workers", "64"], "--workers 64 needs 64 replicas of 1 CPU but the cluster can place 2"),
    (["--workers", "2", "--ray-address", "127.0.0.1:1"], "cannot reach the Ray cluster at 127.0.0.1:1"),
    (["--workers", "2", "--shard", "0/2"], "--workers, --shard and --merge exclude each other"),
])
def test_bad_scale_out_input_gets_one_line(ray_local, tiny_llama, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit, match="1"):
        harness_run(*smoke_args(tiny_llama, tmp_path / "out"), *flags)
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()  # refused before anything was written
