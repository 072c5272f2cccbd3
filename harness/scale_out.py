"""Scale-out of one harness run: the driver plans every run's blocks, replicas (Ray actors, or shards
started by any scheduler) compute them, and the usual in-process run is the fan-in.

The fan-in finds every request in the request cache, so metrics, atomic run folders, the manifest
and the report come out exactly as in-process. Its `engine_stats.json` carries the figures of the
replicas that computed the blocks (`distributed`): otherwise the throughput columns would describe
a run served from cache.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from engine.errors import UserError
from engine.storage.tiers import human
from harness.helm.engine_pool import tokenizer_for

if TYPE_CHECKING:  # HELM is imported after harness.run has set the offline variables
    from harness.blocks import Block
    from harness.generation import CallStats
    from harness.helm.deployment import EngineSpec
    from harness.helm.executor import Planning
    from harness.helm.runner import EngineRunner

    MakeRunner = Callable[[Callable[[EngineSpec], Planning]], EngineRunner]



def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scale-out (README: \"Scale-out\")")
    g.add_argument("--workers", type=int, metavar="N", help="N engine replicas on Ray (a local cluster on this "
                   "machine unless --ray-address or RAY_ADDRESS names one)")
    g.add_argument("--ray-address", metavar="ADDR", help="join a running Ray cluster (HOST:PORT, or 'auto': "
                   "RAY_ADDRESS or the one started on this machine)")
    g.add_argument("--threads-per-worker", type=int, default=1, metavar="K", help="CPUs and torch threads per "
                   "replica (default 1)")
    g.add_argument("--gpus-per-worker", type=float, metavar="G", help="GPUs per replica (default 1 where the "
                   "cluster has GPUs, else 0)")
    g.add_argument("--shard", metavar="I/N", help="without Ray: compute the I-th of N parts of the blocks "
                   "(0 <= I < N) into OUTPUT/shards/, for --merge")
    g.add_argument("--merge", action="store_true", help="fold every OUTPUT/shards/ cache in, then write the runs")


def check_args(args: argparse.Namespace) -> None:
    """One-line errors for contradictory or out-of-range scale-out options."""
    if sum(bool(x) for x in (args.workers, args.shard, args.merge)) > 1:
        raise UserError("--workers, --shard and --merge exclude each other; pick one")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if args.threads_per_worker < 1:
        raise UserError(f"--threads-per-worker must be at least 1, got {args.threads_per_worker}")
    if args.gpus_per_worker is not None and args.gpus_per_worker < 0:
        raise UserError(f"--gpus-per-worker must not be negative, got {args.gpus_per_worker}")
    if args.ray_address and not args.workers:
        raise UserError("--ray-address needs --workers N: the number of replicas to start on that cluster")
    if args.shard:
        from harness.shards import parse_shard

        parse_shard(args.shard)
    if (args.shard or args.merge) and not args.output:
        raise UserError("--shard and --merge need --output: every shard and the merge must share one folder")


def join_cluster(args: argparse.Namespace, offline_env: dict[str, str]):
    """Connect to (or start) the Ray cluster, and give each replica its share of a host's memory when several
    share one host and --cpu-mem names none (so --policy auto searches with that share). Returns ray."""
    from harness.replicas import check_room, connect, host_memory, replicas_per_host

    ray = connect(args.ray_address or os.environ.get("RAY_ADDRESS"), offline_env)
    if args.gpus_per_worker is None:
        args.gpus_per_worker = 1.0 if ray.cluster_resources().get("GPU", 0) else 0.0
    check_room(ray, args.workers, args.threads_per_worker, args.gpus_per_worker)
    share = replicas_per_host(ray, args.workers)
    if share > 1 and args.cpu_mem is None:
        args.cpu_mem = str(host_memory(ray) // share)
        print(f"{share} replicas per host: each gets --cpu-mem {human(int(args.cpu_mem))}", file=sys.stderr)
    return ray


def _driver_planning(spec: EngineSpec, identity: dict) -> Callable[[EngineSpec], Planning]:
    from harness.generation import TokenTexts
    from harness.helm.executor import Planning

    plan = Planning(identity, TokenTexts(tokenizer_for(spec)), None)
    return lambda _: plan


def _per_run(done: list[tuple[str, CallStats, int]], distributed: dict) -> dict[str, dict]:
    """engine_stats.json figures of each run from (run, stats, requests computed) of its blocks elsewhere."""
    from harness.generation import CallStats

    totals: dict[str, tuple[CallStats, list[int]]] = {}
    for run, stats, computed in done:
        total, count = totals.setdefault(run, (CallStats(), [0]))
        total.merge(stats)
        count[0] += computed
    return {run: {**total.to_dict(), "computed_requests": count[0], "distributed": distributed}
            for run, (total, count) in totals.items()}


def on_ray(ray, make_runner: MakeRunner, run_specs: list, spec: EngineSpec,
           args: argparse.Namespace) -> EngineRunner:
    """Compute every unfinished block on `--workers` replicas; the runner returned does the fan-in."""
    from harness.replicas import ReplicaPool

    print(f"starting {args.workers} replicas of {spec.model} ...", flush=True)
    pool = ReplicaPool(ray, spec.to_args(), args.workers, args.threads_per_worker, args.gpus_per_worker,
                       args.offload_dir)
    try:
        runner = make_runner(_driver_planning(spec, pool.identity))
        blocks = runner.collect(run_specs)
        done: list[tuple[str, CallStats, int]] = []

        def commit(block: Block, results: list, stats: CallStats) -> None:
            runner.cache.put_many(list(zip(block.keys, results, strict=True)))
            done.append((block.run, stats, len(block.keys)))

        wall = pool.serve(blocks, commit)
        replicas = [s.figures() for s in pool.slots]
    finally:
        pool.close()
    runner.computed_elsewhere = _per_run(done, {"mode": "ray", "replicas": args.workers, "wall_s": wall,
                                                "per_replica": replicas})
    return runner


def as_shard(make_runner: MakeRunner, run_specs: list, spec: EngineSpec, args: argparse.Namespace,
             output: Path) -> int:
    """Compute this shard's part of the blocks into its own cache file; the fan-in waits for --merge."""
    from harness.blocks import run_block
    from harness.helm.executor import local_planning
    from harness.helm.request_cache import RequestCache
    from harness.shards import ShardFigures, assign, parse_shard, shard_files

    index, shards = parse_shard(args.shard)
    runner = make_runner(local_planning)
    plan = local_planning(spec)
    mine = assign(runner.collect(run_specs), shards)[index]
    cache_file, figures_file = shard_files(output, index, shards)
    cache = RequestCache(cache_file)
    figures = ShardFigures(figures_file, index, shards, plan.identity, socket.gethostname())
    todo = [b for b in mine if any(cache.get(k) is None for k in b.keys)]
    print(f"shard {index}/{shards}: {len(mine)} blocks, {len(mine) - len(todo)} finished earlier", flush=True)
    with tqdm(total=sum(len(b.keys) for b in todo), desc="requests", unit="req", disable=None) as bar:
        for block in todo:
            started = time.perf_counter()
            results, stats = run_block(plan.engine, plan.texts, block, spec.seed)
            cache.put_many(list(zip(block.keys, results, strict=True)))
            figures.add(block, stats, time.perf_counter() - started)
            bar.update(len(block.keys))
    cache.close()
    figures.finish()
    print(f"shard {index}/{shards} done; when every shard is, run the same command with --merge", flush=True)
    return 0


def merged(make_runner: MakeRunner, spec: EngineSpec, output: Path) -> EngineRunner:
    """Fold the shards' caches in; the runner returned does the fan-in with their figures."""
    from harness.generation import CallStats
    from harness.helm.request_cache import RequestCache
    from harness.shards import merge

    cache = RequestCache(output / "request_cache.sqlite")
    identity, shard_figures = merge(output, cache)
    cache.close()
    runner = make_runner(_driver_planning(spec, identity))
    replicas = [{"replica": f["shard"], "node": f["host"], "tok_s": _tok_s(f)} for f in shard_figures]
    distributed = {"mode": "shards", "replicas": len(shard_figures), "per_replica": replicas,
                   "wall_s": max(f["wall_s"] for f in shard_figures)}
    done = [(run, CallStats(**r["stats"]), r["computed_requests"]) for f in shard_figures
            for run, r in f["runs"].items()]
    runner.computed_elsewhere = _per_run(done, distributed)
    return runner


def _tok_s(figures: dict) -> float | None:
    from harness.generation import CallStats

    total = CallStats()
    for run in figures["runs"].values():
        total.merge(CallStats(**run["stats"]))
    return total.to_dict()["generated_tokens_per_s"]
