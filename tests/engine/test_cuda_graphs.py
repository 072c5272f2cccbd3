"""Issue 16: decode steps as CUDA graphs where shapes are static, with a clean fall back to eager.

No GPU here: the capture itself is replaced. An identity "capture" runs the static-shape pass the graph
would replay (one slot written per step, attention over every slot under a mask), which must give HF's
outputs; a capture that raises must leave generation exact, said once.
"""

from __future__ import annotations

import pytest
import torch
from helpers.reference import assert_matches_hf

from engine import Engine, Policy
from engine import schedule as schedule_module
from engine.bench.reference import POLICIES
from engine.flags import ArgumentParser, add_policy_args, policy_from_args
from engine.schedule import graph_blocker

MIXED = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28], [40, 41, 42, 43]]
EVEN = [[5, 6, 7, 8], [12, 13, 14, 15], [20, 21, 22, 23], [40, 41, 42, 43]]  # no row padded
CUDA = torch.device("cuda", 0)


def parse(*argv: str) -> Policy:
    parser = ArgumentParser(prog="test")
    add_policy_args(parser)
    return policy_from_args(parser.parse_args(list(argv)))


def test_graphs_are_on_by_default_and_off_with_the_flag():
    assert parse().cuda_graphs and not parse("--no-cuda-graphs").cuda_graphs


@pytest.mark.parametrize("policy,device,all_bound,blocked", [
    (Policy(), CUDA, True, None),
    (Policy(cuda_graphs=False), CUDA, True, "--no-cuda-graphs"),
    (Policy(), torch.device("cpu"), True, "CUDA"),
    (POLICIES["weights-30-30-40"], CUDA, False, "weights"),
    (POLICIES["cache-cpu-compute"], CUDA, True, "KV cache"),
    (POLICIES["cache-half-disk"], CUDA, True, "KV cache"),
    (Policy(compress_cache=True), CUDA, True, "compressed"),
    (POLICIES["act-split"], CUDA, True, "activations"),
], ids=["resident", "flag-off", "cpu", "weights-split", "cache-cpu", "cache-disk", "cache-compressed", "act-split"])
def test_only_a_step_with_everything_resident_on_a_gpu_is_graphed(policy, device, all_bound, blocked):
    reason = graph_blocker(policy, device, all_bound)
    assert reason is None if blocked is None else blocked in reason


@pytest.fixture
def forced(monkeypatch):
    """Graphs allowed on this CPU; `capture` replaced by the test. Counts DecodeGraph passes."""
    monkeypatch.setattr(schedule_module, "graph_blocker", lambda *args: None)
    runs = [0]
    original = schedule_module.DecodeGraph.run

    def counted(self, *args):
        runs[0] += 1
        return original(self, *args)

    monkeypatch.setattr(schedule_module.DecodeGraph, "run", counted)
    return runs


@pytest.mark.parametrize("name", ["opt", "llama"])
@pytest.mark.parametrize("prompts", [MIXED, EVEN], ids=["padded", "unpadded"])
def test_the_static_pass_a_graph_replays_matches_hf(tiny_models, hf_model, monkeypatch, forced, name, prompts):
    monkeypatch.setattr(schedule_module, "capture", lambda fn: fn)  # the pass as the graph would replay it
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2)
    with Engine.load(tiny_models[name], policy=policy, device="cpu") as eng:
        assert_matches_hf(eng, hf_model(tiny_models[name]), prompts, max_new=5)
        assert forced[0] == 4 * 2  # every decode step of both GPU batches went through the graph
        assert eng.stats.bytes_written["gpu"] > 0 and not eng._rt.graph_failures


def test_a_failed_capture_falls_back_to_eager_and_says_so_once(tiny_models, hf_model, monkeypatch, forced, capsys):
    attempts = [0]

    def failing(fn):
        attempts[0] += 1
        fn()  # a capture fails after its warm-up pass wrote the step's slot: the eager pass must not mind
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(schedule_module, "capture", failing)
    with Engine.load(tiny_models["opt"], policy=Policy(gpu_batch_size=2, num_gpu_batches=2), device="cpu") as eng:
        assert_matches_hf(eng, hf_model(tiny_models["opt"]), MIXED, max_new=5)
        eng.generate(EVEN, max_new_tokens=3)
        assert attempts[0] == 1 and eng._rt.graph_failures == ["RuntimeError: operation not permitted when "
                                                               "stream is capturing"]
    err = capsys.readouterr().err
    assert err.count("cuda graphs: capturing a decode step failed") == 1 and "eagerly" in err


def test_on_a_cpu_no_step_is_graphed(tiny_models, monkeypatch):
    def refuse(*args):
        raise AssertionError("a DecodeGraph was made on a CPU")

    monkeypatch.setattr(schedule_module, "DecodeGraph", refuse)
    with Engine.load(tiny_models["opt"], policy=Policy(gpu_batch_size=2), device="cpu") as eng:
        assert eng.policy.cuda_graphs
        eng.generate(MIXED, max_new_tokens=3)
