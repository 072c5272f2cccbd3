"""HELM's summarize step over a harness output folder: all its variants as one HELM release, under our schema.

Why a staged tree: `harness.run --compare-compression` writes each variant into its own output (O/none, O/w4c4),
while HELM's summarizer and web UI read one `benchmark_output/` tree. We stage one in O/helm_view/ (derived data,
rebuilt on every call): `benchmark_output/runs/<suite>/<run>/` links each run's files, so the runs stay untouched
and HELM's display files land beside the links, and the release `flexhelm` lists every suite. The variants are
distinct HELM models because their deployment names carry the compression variant (deployment.variant_name).

Our schema keeps HELM's own definitions, with the precedence harness.report uses for headline metrics (HELM Lite's
schema, then Classic's), so the UI and report.md headline the same metric; it lists only the run groups our runs
belong to (and the metric groups they show), under one top group per suite, instead of Classic's hundred mostly
empty ones.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml
from helm.benchmark.presentation.summarize import Summarizer

from engine.errors import UserError
from harness.files import write_text_atomic
from harness.helm.deployment import register_helm_configs
from harness.report.runs import find_variants, run_dirs

VIEW_DIR = "helm_view"  # under the output folder; find_variants ignores it (it holds no runs/ of its own)
RELEASE = "flexhelm"
SCHEMA_FILE = "schema_flexhelm.json"
SCHEMA_SOURCES = ("schema_lite.yaml", "schema_classic.yaml")  # first definition of a name wins
SUMMARIZE_WRITES = ("instances.json", "display_predictions.json", "display_requests.json")  # never linked


@dataclass(frozen=True)
class Site:
    """A summarized view: the `benchmark_output` folder HELM's frontend reads, and the release it shows."""

    benchmark_output: Path
    release: str
    suites: tuple[str, ...]
    models: tuple[str, ...]


def stage_runs(out: Path, runs_root: Path) -> dict[str, set[str]]:
    """Link every finished run of every variant of `out` into runs_root/<suite>/<run>/; suite -> HELM run groups.
    Two runs of one name (variants that name their model alike) are refused: HELM would show only one."""
    seen: dict[tuple[str, str], Path] = {}
    groups: dict[str, set[str]] = {}
    for variant in find_variants(out).values():
        for run in run_dirs(variant):
            suite = run.parent.name
            if (suite, run.name) in seen:
                raise UserError(f"{run} and {seen[suite, run.name]} are runs of one name; rerun one of them with "
                                "the current harness (its model name then carries its compression variant)")
            seen[suite, run.name] = run
            staged = runs_root / suite / run.name
            staged.mkdir(parents=True)
            for file in run.iterdir():
                if file.is_file() and file.name not in SUMMARIZE_WRITES:
                    (staged / file.name).symlink_to(file.resolve())
            groups.setdefault(suite, set()).update(json.loads((run / "run_spec.json").read_text()).get("groups", []))
    return groups


def _helm_schema(name: str) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(resources.files("helm.benchmark.static").joinpath(name).read_text(), loader)


def build_schema(groups: dict[str, set[str]]) -> dict:
    """Our schema (module doc) for runs whose suites belong to `groups` (suite -> HELM run groups)."""
    merged: dict[str, dict[str, dict]] = {}
    for source in SCHEMA_SOURCES:
        for section, entries in _helm_schema(source).items():
            for entry in entries or []:
                merged.setdefault(section, {}).setdefault(entry["name"], entry)
    known = merged["run_groups"]
    leaves = sorted({g for names in groups.values() for g in names if g in known and not known[g].get("subgroups")})
    tops = [{"name": f"{RELEASE}_{suite}", "display_name": f"flexhelm {suite} suite",
             "description": f"The runs of the `{suite}` suite on the flexhelm offloading engine, one model per "
                            "compression variant.",
             "category": "flexhelm", "subgroups": sorted(g for g in names if g in leaves)}
            for suite, names in sorted(groups.items())]
    shown = {m for g in leaves for m in known[g].get("metric_groups", [])}
    return {"metrics": list(merged["metrics"].values()), "perturbations": list(merged["perturbations"].values()),
            "metric_groups": [m for name, m in merged["metric_groups"].items() if name in shown],
            "run_groups": tops + [known[g] for g in leaves]}


def _route_helm_logs(path: Path) -> None:
    """HELM logs each step and warns about every metric our schema does not show; keep that in a file."""
    logger = logging.getLogger("helm")
    logger.handlers.clear()
    logger.addHandler(logging.FileHandler(path))
    logger.setLevel(logging.INFO)
    logger.propagate = False


def summarize(out: str | Path, num_threads: int = 2) -> Site:
    """Run HELM's summarize step over every variant of the harness output `out`; the staged site."""
    out = Path(out)
    if not out.is_dir():
        raise UserError(f"{out} is not a folder; pass the --output folder of a harness run (results/<suite>/...)")
    view = out / VIEW_DIR
    try:
        shutil.rmtree(view, ignore_errors=True)
        root = view / "benchmark_output"
        (root / "runs").mkdir(parents=True)
    except OSError as err:
        raise UserError(f"cannot write {view}: {err.strerror}; pass an output folder you can write to") from None
    groups = stage_runs(out, root / "runs")
    write_text_atomic(view / SCHEMA_FILE, json.dumps(build_schema(groups), indent=1))
    _route_helm_logs(view / "helm.log")
    for variant in find_variants(out).values():
        if (variant / "helm_config" / "model_deployments.yaml").is_file():
            register_helm_configs(variant / "helm_config")  # display names of our models
    suites = sorted(groups)
    summarizer = Summarizer(release=RELEASE, suites=suites, suite=None, schema_path=str(view / SCHEMA_FILE),
                            output_path=str(root), verbose=False, num_threads=num_threads,
                            allow_unknown_models=True, schema_validation="warn")
    summarizer.run_pipeline(skip_completed=False)
    models = sorted({run.run_spec.adapter_spec.model for run in summarizer.runs})
    return Site(benchmark_output=root, release=RELEASE, suites=tuple(suites), models=tuple(models))
