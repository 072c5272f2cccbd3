"""End-to-end harness runs through HELM, on a tiny random LLaMA that uses SmolLM2's tokenizer (and on
SmolLM2 itself for the MMLU reference check). Predictions are compared with HF transformers greedy
decoding of the very prompts HELM built."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.paths import HELM_DATA

from engine.bench.reference import hf_greedy
from harness.helm.executor import KILL_AFTER_CALLS_ENV
from harness.helm.request_cache import REQUEST_CACHE_FILE

REPO = Path(__file__).resolve().parents[2]
needs_data = pytest.mark.skipif(not (HELM_DATA / "mmlu").is_dir(),
                                reason=f"offline HELM data not found at {HELM_DATA} (../shared/data)")


def harness_run(*args: str) -> int:
    from harness.run import main

    return main(list(args))


def run_dirs(output: Path, suite: str) -> dict[str, Path]:
    root = output / "runs" / suite
    return {p.name: p for p in root.iterdir() if (p / "run_spec.json").is_file()}


def request_states(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "scenario_state.json").read_text())["request_states"]


def stat(run_dir: Path, name: str) -> float:
    for s in json.loads((run_dir / "stats.json").read_text()):
        if s["name"]["name"] == name and s["name"].get("split") == "test" and "perturbation" not in s["name"]:
            return s["mean"]
    raise KeyError(name)


def assert_matches_hf(run_dir: Path, folder: Path, hf_model) -> int:
    """Every completion equals HF greedy decoding of the same prompt; returns how many were compared."""
    from transformers import AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(folder), hf_model(folder)
    states = request_states(run_dir)
    for state in states:
        request, completion = state["request"], state["result"]["completions"][0]
        ids = tok(request["prompt"])["input_ids"]
        tokens, lps = hf_greedy(model, ids, request["max_tokens"], eos_token_id=2)
        if tokens and tokens[-1] == 2:
            tokens, lps = tokens[:-1], lps[:-1]
        assert completion["text"] == tok.decode(tokens), request["prompt"][-200:]
        assert [t["logprob"] for t in completion["tokens"]] == pytest.approx(lps, abs=2e-3)
    return len(states)


MMLU = "mmlu:subject=anatomy,max_train_instances=2"  # short prompts keep the tiny runs fast
SYNTH = "synthetic_reasoning:mode=pattern_match"


@pytest.fixture(scope="module")
def run_cwd(tmp_path_factory) -> Path:
    """The empty working directory tiny_run runs in."""
    return tmp_path_factory.mktemp("cwd")


@pytest.fixture(scope="module")
def tiny_run(tiny_llama, tmp_path_factory, run_cwd):
    """MMLU anatomy + synthetic_reasoning, 5 instances each, blocks of 2x2 rows, run from `run_cwd`."""
    if not (HELM_DATA / "mmlu").is_dir():
        pytest.skip(f"offline HELM data not found at {HELM_DATA} (../shared/data)")
    out = tmp_path_factory.mktemp("tiny-run")
    cwd = os.getcwd()
    os.chdir(run_cwd)
    try:
        rc = harness_run("--run-entries", MMLU, SYNTH, "--model", str(tiny_llama), "--data-dir", str(HELM_DATA),
                         "--max-eval-instances", "5", "--gpu-batch-size", "2", "--num-gpu-batches", "2",
                         "--output", str(out))
    finally:
        os.chdir(cwd)
    assert rc == 0
    return out


@needs_data
def test_a_run_writes_nothing_into_the_working_directory(tiny_run, run_cwd):
    """HELM writes prod_env/ and benchmark_output/ into the working directory unless told otherwise, and
    offload files, NLTK data and caches could land there too: everything must go under --output."""
    assert (tiny_run / "runs").is_dir() and list(run_cwd.iterdir()) == []


@needs_data
def test_run_writes_helm_run_folders_with_batches(tiny_run):
    dirs = run_dirs(tiny_run, "custom")
    assert len(dirs) == 2
    for run_dir in dirs.values():
        for name in ("run_spec.json", "scenario_state.json", "stats.json", "per_instance_stats.json",
                     "engine_stats.json"):
            assert (run_dir / name).is_file(), name
        engine = json.loads((run_dir / "engine_stats.json").read_text())
        assert engine["block_size"] == 4 and engine["requests"] == 5
        assert engine["mean_batch_size"] == pytest.approx(2.5)  # one call of 4 rows, one of 1
        sizes = sorted(s["result"]["batch_size"] for s in request_states(run_dir))
        assert sizes == [1, 4, 4, 4, 4]
        assert stat(run_dir, "batch_size") > 1  # HELM's own efficiency stat sees the batches
        assert json.loads((run_dir / "run_spec.json").read_text())["adapter_spec"]["model"].startswith("flexhelm/")
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert manifest["compression"] == "none" and manifest["packages"]["crfm-helm"] == "0.5.16"
    assert (tiny_run / "scenarios" / "mmlu" / "data").is_symlink()
    assert not list((tiny_run / ".partial" / "custom").iterdir())  # every staged run was moved into place


@needs_data
def test_tiny_model_predictions_match_hf_greedy(tiny_run, tiny_llama, hf_model):
    compared = sum(assert_matches_hf(d, tiny_llama, hf_model) for d in run_dirs(tiny_run, "custom").values())
    assert compared == 10


@pytest.mark.slow
@needs_data
def test_smollm2_mmlu_predictions_match_hf_greedy(smollm2, hf_model, tmp_path):
    rc = harness_run("--run-entries", "mmlu:subject=anatomy,max_train_instances=1", "--model", "smollm2-135m",
                     "--data-dir", str(HELM_DATA), "--max-eval-instances", "5", "--output", str(tmp_path))
    assert rc == 0
    (run_dir,) = run_dirs(tmp_path, "custom").values()
    assert assert_matches_hf(run_dir, smollm2, hf_model) == 5
    assert stat(run_dir, "batch_size") == 5


def _cache_counts(output: Path) -> list[int]:
    with sqlite3.connect(f"file:{output / REQUEST_CACHE_FILE}?mode=ro", uri=True) as db:
        return [n for (n,) in db.execute("SELECT computed FROM results")]


def _completions(output: Path, suite: str) -> dict:
    return {name: [[(c["text"], [round(t["logprob"], 4) for t in c["tokens"]]) for c in s["result"]["completions"]]
                   for s in request_states(d)] for name, d in run_dirs(output, suite).items()}


@pytest.mark.slow
@needs_data
def test_resume_after_kill_finishes_without_recomputing(tiny_run, tiny_llama, tmp_path):
    """The child kills itself with SIGKILL after its 3rd engine call of one row is committed (the
    executor's FLEXHELM_TEST_KILL_AFTER_CALLS hook): 3 of MMLU's 5 requests are cached, no run is
    finished. The resumed run computes exactly the 7 missing requests."""
    args = ["--run-entries", MMLU, SYNTH, "--model", str(tiny_llama), "--data-dir", str(HELM_DATA),
            "--max-eval-instances", "5", "--gpu-batch-size", "1", "--num-gpu-batches", "1",
            "--output", str(tmp_path)]
    env = {**os.environ, KILL_AFTER_CALLS_ENV: "3"}
    proc = subprocess.run([sys.executable, "-m", "harness.run", *args], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert _cache_counts(tmp_path) == [1, 1, 1]
    assert not list(tmp_path.glob("runs/*/*/run_spec.json"))  # the first run was still staged in .partial/
    assert harness_run(*args, "--resume") == 0
    runs = run_dirs(tmp_path, "custom")
    assert len(runs) == 2
    engine = {name.split(":")[0]: json.loads((d / "engine_stats.json").read_text()) for name, d in runs.items()}
    assert (engine["mmlu"]["cached_requests"], engine["mmlu"]["engine_calls"]) == (3, 2)
    assert (engine["synthetic_reasoning"]["cached_requests"], engine["synthetic_reasoning"]["engine_calls"]) == (0, 5)
    assert _cache_counts(tmp_path) == [1] * 10  # nothing ran twice
    assert _completions(tmp_path, "custom") == _completions(tiny_run, "custom")  # as if never interrupted


@needs_data
def test_resume_skips_finished_runs_and_serves_repeats_from_cache(tiny_run, tiny_llama):
    counts = _cache_counts(tiny_run)
    victim = next(iter(run_dirs(tiny_run, "custom").values()))
    shutil.rmtree(victim)  # as if the run died before its folder was moved into place
    assert harness_run("--run-entries", MMLU, SYNTH, "--model", str(tiny_llama), "--data-dir", str(HELM_DATA),
                       "--max-eval-instances", "5", "--gpu-batch-size", "2", "--num-gpu-batches", "2",
                       "--output", str(tiny_run), "--resume") == 0
    assert _cache_counts(tiny_run) == counts
    engine = json.loads((victim / "engine_stats.json").read_text())
    assert engine["cached_requests"] == 5 and engine["engine_calls"] == 0


@needs_data
def test_zero_instances_is_an_error(tiny_llama, tmp_path):
    data = tmp_path / "data" / "mmlu" / "data"
    for split in ("dev", "test"):
        (data / split).mkdir(parents=True)
        (data / split / f"anatomy_{split}.csv").write_text("")
    rc = harness_run("--run-entries", MMLU, "--model", str(tiny_llama), "--data-dir", str(tmp_path / "data"),
                     "--output", str(tmp_path / "out"))
    assert rc == 1
    assert not (tmp_path / "out" / "runs" / "custom").exists() or not run_dirs(tmp_path / "out", "custom")


def test_missing_data_is_skipped_with_reason(tiny_llama, tmp_path, capsys):
    rc = harness_run("--run-entries", MMLU, "legalbench:subset=proa", "--model", str(tiny_llama),
                     "--output", str(tmp_path))
    out = capsys.readouterr().out
    assert rc == 0
    assert "no data for mmlu" in out and "legalbench fetches its prompt settings" in out


@needs_data
def test_helm_lite_offline_runs_what_has_data(tiny_llama, tmp_path, capsys):
    data = tmp_path / "data"  # MMLU only, so GSM's 400-token answers stay out of the test budget
    data.mkdir()
    (data / "mmlu").symlink_to(HELM_DATA / "mmlu")
    rc = harness_run("--suite", "helm-lite", "--model", str(tiny_llama), "--data-dir", str(data),
                     "--max-eval-instances", "1", "--output", str(tmp_path / "out"))
    out = capsys.readouterr().out
    assert rc == 0
    ran = run_dirs(tmp_path / "out", "helm-lite")
    assert len(ran) == 5 and all(name.startswith("mmlu:") for name in ran)
    assert "skipped (23):" in out
    for reason in ("taken off the Hugging Face Hub", "legalbench fetches", "wmt14", "no data for narrativeqa",
                   "no data for med_qa", "no data for openbookqa", "no data for natural_qa", "no data for gsm"):
        assert reason in out, reason


@pytest.mark.slow
@needs_data
def test_stock_helm_run_uses_the_micro_batching_client(tiny_run, tmp_path):
    from scenarios.offline import link_data_dir

    link_data_dir(HELM_DATA, tmp_path / "out" / "scenarios")
    deployment = json.loads((tiny_run / "manifest.json").read_text())["deployment"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    helm_bin = Path(sys.executable).parent
    subprocess.run([helm_bin / "helm-run", "--local-path", str(tiny_run / "helm_config"), "--run-entries",
                    f"{MMLU},model={deployment}", "--max-eval-instances", "4", "-n", "4", "--suite", "stock",
                    "-o", str(tmp_path / "out")], check=True, env=env, cwd=tmp_path, capture_output=True)
    (run_dir,) = run_dirs(tmp_path / "out", "stock").values()
    assert stat(run_dir, "batch_size") > 1  # concurrent requests shared engine calls
    ours = {s["request"]["prompt"]: s["result"]["completions"][0]["text"]
            for d in run_dirs(tiny_run, "custom").values() for s in request_states(d)}
    stock = {s["request"]["prompt"]: s["result"]["completions"][0]["text"] for s in request_states(run_dir)}
    common = set(ours) & set(stock)
    assert common and all(ours[p] == stock[p] for p in common)  # same answers as the batching executor
    subprocess.run([helm_bin / "helm-summarize", "--suite", "stock", "-o", str(tmp_path / "out")], check=True,
                   env=env, cwd=tmp_path, capture_output=True)
    assert (tmp_path / "out" / "runs" / "stock" / "groups").is_dir()
