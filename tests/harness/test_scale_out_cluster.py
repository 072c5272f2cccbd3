"""Scale-out across nodes: a simulated 2-node Ray cluster (ray.cluster_utils.Cluster, 1 CPU each, on
loopback), joined with --ray-address as a user joins theirs; the blocks are served on both nodes."""

from __future__ import annotations

import json

import pytest
from helpers.paths import HELM_DATA

from harness.replicas import ray_for
from harness.run import OFFLINE_ENV, main

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (HELM_DATA / "mmlu").is_dir(),
                                                   reason=f"offline HELM data not found at {HELM_DATA}")]


def test_blocks_are_served_on_both_nodes(tiny_llama, tmp_path):
    ray = ray_for(None)
    if ray.is_initialized():
        ray.shutdown()
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "env_vars": OFFLINE_ENV})
    cluster.add_node(num_cpus=1, env_vars=OFFLINE_ENV)
    try:
        assert main(["--run-entries", "synthetic_reasoning:model=text,mode=pattern_match", "--model", str(tiny_llama),
                     "--data-dir", str(HELM_DATA), "--max-eval-instances", "4", "--gpu-batch-size", "1",
                     "--num-gpu-batches", "1", "--output", str(tmp_path), "--workers", "2",
                     "--ray-address", cluster.address]) == 0
    finally:
        ray.shutdown()
        cluster.shutdown()
    (stats,) = [json.loads(p.read_text()) for p in tmp_path.glob("runs/*/*/engine_stats.json")]
    replicas = stats["distributed"]["per_replica"]
    assert len({r["node"] for r in replicas}) == 2  # one replica per node
    assert all(r["blocks"] > 0 for r in replicas)
    assert sum(r["rows"] for r in replicas) == stats["computed_requests"] == 4
