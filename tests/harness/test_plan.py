"""harness.plan on the FlexGen paper's seven HELM sub-scenarios, offline: which run, which are skipped."""

from __future__ import annotations

import pytest
from helpers.paths import HELM_DATA

from engine.policy import Policy
from harness.helm.deployment import EngineSpec, register_helm_configs, write_local_config
from harness.helm.engine_pool import model_facts
from harness.plan import plan_runs
from harness.report.runs import entry_of
from harness.suites import load_run_entries
from scenarios.offline import link_data_dir


@pytest.mark.skipif(not (HELM_DATA / "mmlu").is_dir(), reason=f"offline HELM data not found at {HELM_DATA}")
def test_flexgen_paper_plans_the_four_sub_scenarios_that_need_no_download(tmp_path, smollm2):
    spec = EngineSpec.create("smollm2-135m", None, Policy())
    register_helm_configs(write_local_config(tmp_path / "helm_config", spec, model_facts(spec)))
    link_data_dir(HELM_DATA, tmp_path / "scenarios")
    _, entries = load_run_entries("flexgen-paper", [])
    assert len(entries) == 7
    run_specs, skipped = plan_runs(entries, spec.deployment, str(tmp_path / "scenarios"), 3, None)
    assert sorted(entry_of(s.name) for s in run_specs) == [
        "mmlu:subject=abstract_algebra,method=multiple_choice_joint",
        "mmlu:subject=us_foreign_policy,method=multiple_choice_joint",
        "synthetic_reasoning:mode=pattern_match",
        "synthetic_reasoning_natural:difficulty=easy",  # HELM names its scenario sythetic_reasoning_natural
    ]
    assert sorted(s.entry.split(":")[0] for s in skipped) == ["summarization_xsum_sampled", "wikifact", "wikifact"]
    assert all("no data for wikifact" in s.reason for s in skipped if s.entry.startswith("wikifact"))
