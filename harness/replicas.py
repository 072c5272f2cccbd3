"""Engine replicas on Ray Core: one actor per replica, fed blocks longest first by the driver.

Ray only moves blocks and results; the driver alone writes the request cache (SQLite over a network
filesystem is unsafe), one transaction per block as it arrives. A replica that dies loses only the
block in flight, which goes back to the queue, and a fresh actor takes its place once.

Nothing reaches a network the user did not name: usage statistics are off before Ray is imported,
no dashboard starts, and a local cluster binds to loopback only.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from engine.errors import UserError
from harness.blocks import Block, longest_first, run_block
from harness.generation import CallStats
from harness.helm.deployment import EngineSpec

# Set before Ray is imported: its constants are read at import time.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # Ray's switch for a single-machine, loopback-only node
KILL_REPLICA_AFTER_BLOCKS_ENV = "FLEXHELM_TEST_KILL_REPLICA_AFTER_BLOCKS"  # tests: ray.kill a busy replica
RESTARTS_PER_REPLICA = 1


def ray_for(address: str | None):
    """The ray module, imported with usage statistics off (and loopback only when no cluster is named)."""
    os.environ.update(RAY_ENV)
    if address is None:
        for name, value in LOOPBACK_ENV.items():
            os.environ.setdefault(name, value)
    import ray

    return ray


def _reachable(address: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray-address {address!r} is not HOST:PORT; pass the head node's address "
                        "(as `ray start --head` prints it) or 'auto'")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise UserError(f"cannot reach the Ray cluster at {address}: {err.strerror or err}; start it with "
                        "`ray start --head` or fix --ray-address") from None


def start_local(num_cpus: int, env: dict[str, str]):
    """A one-machine Ray cluster on loopback, without a dashboard; returns the ray module."""
    ray = ray_for(None)
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {**RAY_ENV, **env}})
    return ray


def connect(address: str | None, env: dict[str, str]):
    """Join the cluster at `address` ('auto': the one RAY_ADDRESS or this machine names), or start a local one
    with this machine's CPUs. A process that already runs Ray (a test, a notebook) keeps its cluster.
    `env` goes to every replica. Returns the ray module."""
    if address and address != "auto":
        _reachable(address.removeprefix("ray://"))
    ray = ray_for(address)
    if ray.is_initialized():
        return ray
    if address is None:
        return start_local(os.cpu_count() or 1, env)
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {**RAY_ENV, **env}})
    except ConnectionError as err:
        raise UserError(f"no Ray cluster at --ray-address {address}: {str(err).splitlines()[0]}; start one with "
                        "`ray start --head --disable-usage-stats --include-dashboard false`") from None
    return ray


def placeable(ray, cpus: float, gpus: float) -> int:
    """How many replicas of `cpus` CPUs and `gpus` GPUs the cluster's live nodes can hold at once."""
    total = 0
    for node in _live_nodes(ray):
        res = node["Resources"]
        fits = [math.floor(res.get("CPU", 0) / cpus + 1e-9)] if cpus else []
        fits += [math.floor(res.get("GPU", 0) / gpus + 1e-9)] if gpus else []
        total += min(fits) if fits else 0
    return total


def replicas_per_host(ray, workers: int) -> int:
    """Replicas that share one host's memory when `workers` spread evenly over the live nodes."""
    hosts = {n["NodeManagerAddress"] for n in _live_nodes(ray)}
    return max(1, math.ceil(workers / max(1, len(hosts))))


def _live_nodes(ray) -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU")]


def host_memory(ray) -> int:
    """The memory Ray schedules on the smallest live node, bytes."""
    return int(min(n["Resources"].get("memory", 0) for n in _live_nodes(ray)))


class Replica:
    """One engine replica (a Ray actor): loads its engine once and computes the blocks it is handed."""

    def __init__(self, spec_args: dict, threads: int):
        from harness.helm.executor import local_planning

        torch.set_num_threads(threads)
        self.spec = EngineSpec(**spec_args)
        self.plan = local_planning(self.spec)

    def describe(self) -> dict:
        """The request-cache identity its engine resolved, and where it runs."""
        import ray

        return {"identity": self.plan.identity, "node": ray.get_runtime_context().get_node_id(),
                "host": socket.gethostname(), "pid": os.getpid()}

    def run(self, block: Block) -> tuple[list, CallStats]:
        return run_block(self.plan.engine, self.plan.texts, block, self.spec.seed)


@dataclass
class _Slot:
    """A replica's place in the pool: its actor, where it runs, and what it computed."""

    index: int
    actor: object
    node: str
    restarts: int = 0
    stats: CallStats = field(default_factory=CallStats)

    def figures(self) -> dict:
        d = self.stats.to_dict()
        return {"replica": self.index, "node": self.node, "blocks": self.stats.calls, "rows": self.stats.rows,
                "generated_tokens": d["generated_tokens"], "tok_s": d["generated_tokens_per_s"],
                "restarts": self.restarts}


def check_room(ray, workers: int, cpus: int, gpus: float) -> None:
    """One line when the cluster cannot hold `workers` replicas at once (they would wait forever)."""
    room = placeable(ray, cpus, gpus)
    if workers > room:
        each = f"{cpus} CPU" + (f", {gpus:g} GPU" if gpus else "")
        raise UserError(f"--workers {workers} needs {workers} replicas of {each} but the cluster can place {room};"
                        " lower --workers or --threads-per-worker, or add nodes")


class ReplicaPool:
    """`workers` replicas of one engine spec, each with `cpus` CPUs (torch threads) and `gpus` GPUs."""

    def __init__(self, ray, spec_args: dict, workers: int, cpus: int, gpus: float, offload_dir: str | None):
        check_room(ray, workers, cpus, gpus)
        self.ray, self.spec_args, self.cpus, self.gpus, self.offload_dir = ray, spec_args, cpus, gpus, offload_dir
        actors = [self._start(i) for i in range(workers)]
        infos = self._ready(actors)
        if len({repr(sorted(info["identity"].items())) for info in infos}) != 1:
            raise UserError("the replicas resolved different devices or dtypes, so their outputs would differ; "
                            "give every replica the same kind of device (--gpus-per-worker)")
        self.identity: dict = infos[0]["identity"]
        self.slots = [_Slot(i, a, info["node"]) for i, (a, info) in enumerate(zip(actors, infos, strict=True))]

    def _start(self, index: int):
        args = dict(self.spec_args)
        if self.offload_dir:  # each replica its own folder: two engines never share offload files
            args["load"] = {**args.get("load", {}), "offload_dir": os.path.join(self.offload_dir, f"replica-{index}")}
        remote = self.ray.remote(Replica).options(num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=0)
        return remote.remote(args, self.cpus)

    def _ready(self, actors: list) -> list[dict]:
        try:
            return self.ray.get([a.describe.remote() for a in actors])
        except Exception as err:  # the engine failed to load: the cause's last line says why
            cause = str(getattr(err, "cause", None) or err).strip().splitlines()
            raise UserError(f"a replica failed to load its engine: {cause[-1] if cause else type(err).__name__}") \
                from None

    def serve(self, blocks: list[Block], commit: Callable[[Block, list, CallStats], None]) -> float:
        """Compute every block on the replicas, longest first; `commit` gets each block's results as they
        arrive. A dead replica's block goes back to the queue. Returns the wall time."""
        from ray.exceptions import RayActorError

        queue, running = deque(longest_first(blocks)), {}
        idle = list(self.slots)
        kill_after, done = int(os.environ.get(KILL_REPLICA_AFTER_BLOCKS_ENV, 0)), 0
        started = time.perf_counter()
        with tqdm(total=sum(len(b.keys) for b in blocks), desc="requests", unit="req", disable=None,
                  dynamic_ncols=True) as bar:
            while queue or running:
                while idle and queue:
                    slot, block = idle.pop(0), queue.popleft()
                    running[slot.actor.run.remote(block)] = (slot, block)
                (ref,), _ = self.ray.wait(list(running), num_returns=1)
                slot, block = running.pop(ref)
                try:
                    results, stats = self.ray.get(ref)
                except RayActorError:
                    queue.appendleft(block)
                    self._replace(slot, idle, running)
                    continue
                except Exception as err:
                    raise UserError(f"replica {slot.index} failed on a block of {block.run}: "
                                    f"{str(getattr(err, 'cause', None) or err).strip().splitlines()[-1]}; "
                                    "finished blocks are cached: rerun with --resume") from None
                commit(block, results, stats)
                slot.stats.merge(stats)
                idle.append(slot)
                bar.update(len(block.keys))
                done += 1
                if done == kill_after and running:
                    self.ray.kill(next(iter(running.values()))[0].actor, no_restart=True)
        return time.perf_counter() - started

    def _replace(self, slot: _Slot, idle: list[_Slot], running: dict) -> None:
        """Start a fresh actor in a dead replica's place, once; without one the others carry on."""
        if slot.restarts < RESTARTS_PER_REPLICA:
            slot.restarts += 1
            actor = self._start(slot.index)
            try:
                slot.node = self.ray.get(actor.describe.remote())["node"]
                slot.actor = actor
                idle.append(slot)
                return
            except Exception:
                pass
        self.slots = [s for s in self.slots if s is not slot]
        if not self.slots:
            raise UserError("every replica died; finished blocks are cached: rerun with --resume")

    def close(self) -> None:
        for slot in self.slots:
            self.ray.kill(slot.actor)
