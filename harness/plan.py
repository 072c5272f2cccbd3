"""Turn run entries into HELM run specs, leaving out (with a reason) those that cannot run offline."""

from __future__ import annotations

from dataclasses import dataclass

from helm.benchmark.presentation.run_entry import RunEntry
from helm.benchmark.run import run_entries_to_run_specs
from helm.benchmark.run_spec import RunSpec
from helm.benchmark.scenarios.scenario import create_scenario
from helm.common.object_spec import parse_object_spec

from harness.suites import bind_model
from scenarios.offline import check_before_run_spec, check_run_spec


@dataclass(frozen=True)
class Skipped:
    entry: str
    reason: str


def plan_runs(entries: list[RunEntry], deployment: str, scenarios_dir: str, max_eval_instances: int | None,
              num_train_trials: int | None) -> tuple[list[RunSpec], list[Skipped]]:
    run_specs: list[RunSpec] = []
    skipped: list[Skipped] = []
    for entry in entries:
        entry = bind_model(entry, deployment)
        parsed = parse_object_spec(entry.description)
        check = check_before_run_spec(parsed.class_name, parsed.args, scenarios_dir)
        if not check.ok:
            skipped.append(Skipped(entry.description, check.reason))
            continue
        try:
            specs = run_entries_to_run_specs([entry], max_eval_instances=max_eval_instances,
                                             num_train_trials=num_train_trials)
        except Exception as err:  # HELM raises plain exceptions for bad entries and offline fetches
            skipped.append(Skipped(entry.description, f"HELM cannot build its run spec: {err}".splitlines()[0]))
            continue
        for spec in specs:
            scenario = create_scenario(spec.scenario_spec)
            check = check_run_spec(scenario.name, spec.scenario_spec.args,
                                   [m.class_name for m in spec.metric_specs], scenarios_dir)
            if check.ok:
                run_specs.append(spec)
            else:
                skipped.append(Skipped(spec.name, check.reason))
    return run_specs, skipped
