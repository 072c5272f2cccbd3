"""HELM Executor that runs a whole run spec's requests on the engine in large batches.

HELM's stock Executor sends requests one at a time from a thread pool. This one receives all
request states at once, answers repeats from the request cache, plans blocks (harness.blocks: same
generation parameters, bucketed by prompt length, `policy.block_size` rows each) and fills every
`RequestResult` with real logprobs, `batch_size` and `batch_request_time`. A scale-out driver uses it
twice: collecting (plan the blocks, compute nothing), then, once replicas filled the cache, as the fan-in.

Testing hook: with FLEXHELM_TEST_KILL_AFTER_CALLS=N in the environment, the process kills itself
with SIGKILL right after its N-th engine call is committed to the request cache, exactly as a
`kill -9` at that point would; tests of `--resume` use it instead of racing a timer.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from helm.benchmark.adaptation.scenario_state import ScenarioState
from helm.benchmark.executor import ExecutionSpec, Executor
from helm.common.hierarchical_logger import hlog
from tqdm import tqdm

from engine import Engine
from harness.blocks import Block, plan_blocks, run_block
from harness.generation import CallStats, TokenTexts
from harness.helm.deployment import EngineSpec, spec_of_deployment
from harness.helm.engine_pool import engine_for, output_identity
from harness.helm.request_cache import RequestCache, request_key

KILL_AFTER_CALLS_ENV = "FLEXHELM_TEST_KILL_AFTER_CALLS"


class ZeroInstancesError(RuntimeError):
    """A scenario produced no requests: its data is missing or empty, which must not pass as success."""


class RequestsCollected(Exception):
    """Raised by a collecting executor to stop a run once its blocks are planned (harness.scale_out)."""

    def __init__(self, blocks: list[Block]):
        super().__init__(f"{len(blocks)} blocks")
        self.blocks = blocks


@dataclass
class Planning:
    """What planning a run's blocks needs: the request-cache identity, the token texts, and the engine
    that computes them (None in a scale-out driver, where replicas compute and this process only plans)."""

    identity: dict
    texts: TokenTexts
    engine: Engine | None


_texts: weakref.WeakKeyDictionary[Engine, TokenTexts] = weakref.WeakKeyDictionary()  # per engine, gone with it


def local_planning(spec: EngineSpec) -> Planning:
    """Planning on this process's own engine, loaded on first use."""
    engine = engine_for(spec)
    texts = _texts.get(engine) or _texts.setdefault(engine, TokenTexts(engine.tokenizer))
    return Planning(output_identity(spec, engine), texts, engine)


class EngineExecutor(Executor):
    def __init__(self, execution_spec: ExecutionSpec, cache: RequestCache,
                 planning: Callable[[EngineSpec], Planning] = local_planning):
        super().__init__(execution_spec)
        self.cache = cache
        self.planning = planning
        self.collect = False  # plan blocks and raise RequestsCollected instead of computing them
        self.last_run: dict = {}  # figures of the last execute(), for engine_stats.json
        self._kill_after = int(os.environ.get(KILL_AFTER_CALLS_ENV, 0))
        self._committed_calls = 0

    def execute(self, scenario_state: ScenarioState) -> ScenarioState:
        states = scenario_state.request_states
        if not states:
            raise ZeroInstancesError("the scenario produced zero instances; its data is missing or empty")
        if self.execution_spec.dry_run:
            return scenario_state
        deployments = {s.request.model_deployment for s in states}
        if len(deployments) != 1:
            raise ValueError(f"one run spec must use one model deployment, got {sorted(deployments)}")
        spec = spec_of_deployment(deployments.pop())
        plan = self.planning(spec)

        keys = [request_key(plan.identity, s.request) for s in states]
        found = {k: r for k in set(keys) if (r := self.cache.get(k)) is not None}
        todo = [i for i, k in enumerate(keys) if k not in found]
        blocks = plan_blocks([keys[i] for i in todo], [states[i].request for i in todo], plan.texts,
                             spec.policy_obj.block_size)
        if self.collect:
            raise RequestsCollected(blocks)
        if blocks and plan.engine is None:
            raise RuntimeError(f"{len(todo)} requests were not computed by the replicas; rerun to compute them")
        total = CallStats()
        with tqdm(total=len(todo), desc="instances", unit="req", disable=None, dynamic_ncols=True) as bar:
            for block in blocks:
                results, stats = run_block(plan.engine, plan.texts, block, spec.seed)
                self.cache.put_many(list(zip(block.keys, results, strict=True)))
                self._committed_calls += 1
                if self._committed_calls == self._kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
                found.update(zip(block.keys, results, strict=True))
                total.merge(stats)
                bar.update(len(block.keys))
                tok_s = stats.to_dict()["generated_tokens_per_s"]
                bar.set_postfix(batch=len(block.keys), tok_s=f"{tok_s:.1f}" if tok_s else "-")
        hlog(f"{len(states)} requests: {len(states) - len(todo)} from the request cache, "
             f"{len(todo)} in {total.calls} engine calls")
        self.last_run = {"requests": len(states), "cached_requests": len(states) - len(todo),
                         "block_size": spec.policy_obj.block_size, **total.to_dict()}
        return dataclasses.replace(
            scenario_state, request_states=[dataclasses.replace(s, result=found[k]) for s, k in zip(states, keys,
                                                                                                       strict=True)])
