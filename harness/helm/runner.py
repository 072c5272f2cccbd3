"""HELM Runner that executes on the engine, writes run folders atomically and records engine figures.

Use it in-process (`python -m harness.run`) or with stock HELM:
`helm-run --runner-class-name harness.helm.runner.EngineRunner --local-path DIR ...`.
Each run is written into `<output>/.partial/<suite>/<run>` and renamed into
`<output>/runs/<suite>/<run>` only when complete, so a killed run never leaves a folder that
looks finished; `engine_stats.json` sits beside HELM's files.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import traceback
from collections.abc import Callable

from helm.benchmark.executor import ExecutionSpec
from helm.benchmark.metrics.metric_service import MetricService
from helm.benchmark.run_spec import RunSpec
from helm.benchmark.runner import Runner
from helm.benchmark.window_services.tokenizer_service import TokenizerService
from helm.common.hierarchical_logger import hlog

from harness.blocks import Block
from harness.files import write_json_atomic
from harness.helm.deployment import EngineSpec
from harness.helm.executor import EngineExecutor, Planning, RequestsCollected, local_planning
from harness.helm.request_cache import REQUEST_CACHE_FILE, RequestCache

ENGINE_STATS_FILE = "engine_stats.json"


class EngineRunner(Runner):
    def __init__(self, execution_spec: ExecutionSpec, output_path: str, suite: str, skip_instances: bool,
                 cache_instances: bool, cache_instances_only: bool, skip_completed_runs: bool,
                 exit_on_error: bool, planning: Callable[[EngineSpec], Planning] = local_planning):
        super().__init__(execution_spec, output_path, suite, skip_instances, cache_instances,
                         cache_instances_only, skip_completed_runs, exit_on_error)
        self.cache = RequestCache(os.path.join(output_path, REQUEST_CACHE_FILE))
        self.executor = EngineExecutor(execution_spec, self.cache, planning)
        self.tokenizer_service = TokenizerService(self.executor.context)
        self.metric_service = MetricService(self.executor.context)
        self.partial_path = os.path.join(output_path, ".partial", suite)
        self._staging: str | None = None
        self.outcomes: dict[str, str] = {}  # run name -> "done", "done earlier" or "failed: <why>"
        self.computed_elsewhere: dict[str, dict] = {}  # run name -> figures of replicas that computed its blocks

    def _get_run_path(self, run_spec: RunSpec) -> str:
        return self._staging or super()._get_run_path(run_spec)

    def run_all(self, run_specs: list[RunSpec]) -> None:
        """Run every spec; a failure is recorded and the next run goes on (unless exit_on_error)."""
        for run_spec in run_specs:
            try:
                self.run_one(run_spec)
            except Exception as err:
                if self.exit_on_error:
                    raise
                hlog(f"Error when running {run_spec.name}:\n{traceback.format_exc()}")
                self.outcomes[run_spec.name] = f"failed: {type(err).__name__}: {err}".splitlines()[0]

    def collect(self, run_specs: list[RunSpec]) -> list[Block]:
        """The blocks every unfinished run still needs, planned as `run_one` would, computing nothing.

        A run that fails while planning (missing data, say) is left out here; `run_all` records its failure.
        """
        blocks: list[Block] = []
        self.executor.collect = True
        try:
            for run_spec in run_specs:
                if self.skip_completed_runs and self._is_run_completed(super()._get_run_path(run_spec)):
                    continue
                try:
                    self._staged(run_spec)
                except RequestsCollected as planned:
                    blocks += [dataclasses.replace(b, run=run_spec.name) for b in planned.blocks]
                except Exception:
                    hlog(f"Planning {run_spec.name} failed:\n{traceback.format_exc()}")
                finally:
                    shutil.rmtree(os.path.join(self.partial_path, run_spec.name), ignore_errors=True)
        finally:
            self.executor.collect = False
        return blocks

    def _staged(self, run_spec: RunSpec) -> str:
        """HELM's run_one, writing into a fresh staging folder; returns that folder."""
        staging = os.path.join(self.partial_path, run_spec.name)
        shutil.rmtree(staging, ignore_errors=True)
        self._staging = staging
        try:
            super().run_one(run_spec)
        finally:
            self._staging = None
        return staging

    def run_one(self, run_spec: RunSpec) -> None:
        final = super()._get_run_path(run_spec)
        if self.skip_completed_runs and self._is_run_completed(final):
            hlog(f"Skipping run {run_spec.name}: it completed earlier")
            self.outcomes[run_spec.name] = "done earlier"
            return
        staging = self._staged(run_spec)
        figures = dict(self.executor.last_run)
        elsewhere = self.computed_elsewhere.get(run_spec.name)
        if elsewhere:  # the fan-in found every request cached; say what the replicas computed for it
            figures.update(elsewhere, cached_requests=figures["requests"] - elsewhere["computed_requests"])
        write_json_atomic(os.path.join(staging, ENGINE_STATS_FILE), figures)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.replace(staging, final)
        self.outcomes[run_spec.name] = "done"
