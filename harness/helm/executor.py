"""HELM Executor that runs a whole run spec's requests on the engine in large batches.

HELM's stock Executor sends requests one at a time from a thread pool. This one receives all
request states at once, answers repeats from the request cache, plans engine calls (same
generation parameters, bucketed by prompt length, `policy.block_size` rows each) and fills every
`RequestResult` with real logprobs, `batch_size` and `batch_request_time`.

Testing hook: with FLEXHELM_TEST_KILL_AFTER_CALLS=N in the environment, the process kills itself
with SIGKILL right after its N-th engine call is committed to the request cache, exactly as a
`kill -9` at that point would; tests of `--resume` use it instead of racing a timer.
"""

from __future__ import annotations

import dataclasses
import os
import signal

from helm.benchmark.adaptation.scenario_state import ScenarioState
from helm.benchmark.executor import ExecutionSpec, Executor
from helm.common.hierarchical_logger import hlog
from tqdm import tqdm

from harness.batching import GenerationParams, plan_engine_calls
from harness.generation import CallStats, TokenTexts, run_engine_call
from harness.helm.deployment import spec_of_deployment
from harness.helm.engine_pool import engine_for, output_identity
from harness.helm.request_cache import RequestCache, request_key

KILL_AFTER_CALLS_ENV = "FLEXHELM_TEST_KILL_AFTER_CALLS"


class ZeroInstancesError(RuntimeError):
    """A scenario produced no requests: its data is missing or empty, which must not pass as success."""


class EngineExecutor(Executor):
    def __init__(self, execution_spec: ExecutionSpec, cache: RequestCache):
        super().__init__(execution_spec)
        self.cache = cache
        self.last_run: dict = {}  # figures of the last execute(), for engine_stats.json
        self._texts: dict[int, TokenTexts] = {}
        self._kill_after = int(os.environ.get(KILL_AFTER_CALLS_ENV, 0))
        self._committed_calls = 0

    def _token_texts(self, engine) -> TokenTexts:
        texts = self._texts.get(id(engine))
        if texts is None:
            texts = self._texts[id(engine)] = TokenTexts(engine.tokenizer)
        return texts

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
        engine = engine_for(spec)
        texts = self._token_texts(engine)
        identity = output_identity(spec, engine)

        keys = [request_key(identity, s.request) for s in states]
        results = [self.cache.get(k) for k in keys]
        todo = [i for i, r in enumerate(results) if r is None]
        prompt_ids = {i: texts.encode_prompt(states[i].request.prompt) for i in todo}
        calls = plan_engine_calls([GenerationParams.of(states[i].request) for i in todo],
                                  [len(prompt_ids[i]) for i in todo], spec.policy_obj.block_size)
        total = CallStats()
        with tqdm(total=len(todo), desc="instances", unit="req", disable=None, dynamic_ncols=True) as bar:
            for call in calls:
                rows = [todo[j] for j in call]
                call_results, stats = run_engine_call(
                    engine, texts, [states[i].request for i in rows], spec.seed, [prompt_ids[i] for i in rows])
                self.cache.put_many([(keys[i], r) for i, r in zip(rows, call_results, strict=True)])
                self._committed_calls += 1
                if self._committed_calls == self._kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
                for i, r in zip(rows, call_results, strict=True):
                    results[i] = r
                total.merge(stats)
                bar.update(len(rows))
                tok_s = stats.to_dict()["generated_tokens_per_s"]
                bar.set_postfix(batch=len(rows), tok_s=f"{tok_s:.1f}" if tok_s else "-")
        hlog(f"{len(states)} requests: {len(states) - len(todo)} from the request cache, "
             f"{len(todo)} in {total.calls} engine calls")
        self.last_run = {"requests": len(states), "cached_requests": len(states) - len(todo),
                         "block_size": spec.policy_obj.block_size, **total.to_dict()}
        return dataclasses.replace(
            scenario_state,
            request_states=[dataclasses.replace(s, result=r) for s, r in zip(states, results, strict=True)])
