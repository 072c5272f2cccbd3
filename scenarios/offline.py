"""Offline scenario data: link a read-only data folder into HELM's scenario cache, and decide per
run entry whether its data is present, with a one-line reason when it is not.

HELM's `ensure_file_downloaded` skips files that already exist, so a scenario runs offline when
its files sit under `<output>/scenarios/<scenario name>/`. We never write into `--data-dir`: each
scenario gets a real folder in the output whose entries are symlinks into the data folder, so
HELM's `.lock` files land in the output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Scenarios that generate their instances from a seed and download nothing, by `Scenario.name`.
# crfm-helm 0.5.16 spells synthetic_reasoning_natural's name "sythetic_reasoning_natural" (sic);
# the correct spelling stays in case a later HELM fixes it.
NO_DATA_NEEDED = {"synthetic_reasoning", "sythetic_reasoning_natural", "synthetic_reasoning_natural", "dyck_language"}
NO_DATA_PREFIXES = ("simple",)

# Exact files some scenarios read, as a function of the scenario's args.
REQUIRED_FILES = {
    "mmlu": lambda args: [f"data/dev/{args['subject']}_dev.csv", f"data/test/{args['subject']}_test.csv"],
    "gsm": lambda args: ["gsm_data_train", "gsm_data_test"],
    "legalbench": lambda args: ["data/prompt_construction_settings.json"],
}

MATH_GONE = ("MATH (hendrycks/competition_math) has been taken off the Hugging Face Hub; it runs only from a "
             "pre-filled datasets cache at <data-dir>/MATH/data")
WMT_NEEDS_HF_CACHE = ("wmt_14 loads wmt14 through Hugging Face datasets, which needs the full dataset in the HF "
                      "datasets cache (HF_DATASETS_CACHE); none found")
SUMMARIZATION_EXTRAS = ("summarization metrics need HELM's summarization extras (pip install "
                        "'crfm-helm[summarization]') and download scorer models at run time")


@dataclass(frozen=True)
class DataCheck:
    ok: bool
    reason: str = ""


def link_data_dir(data_dir: str | os.PathLike | None, scenarios_dir: str | os.PathLike) -> list[str]:
    """Expose every scenario folder of `data_dir` under `scenarios_dir` by symlinks; return their names."""
    if data_dir is None:
        return []
    data_dir, scenarios_dir = Path(data_dir).resolve(), Path(scenarios_dir)
    linked = []
    for source in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        target = scenarios_dir / source.name
        target.mkdir(parents=True, exist_ok=True)
        for entry in source.iterdir():
            if entry.name.endswith(".lock"):
                continue
            link = target / entry.name
            if not link.exists() and not link.is_symlink():
                link.symlink_to(entry)
        linked.append(source.name)
    return linked


def _has_files(folder: Path) -> bool:
    return folder.is_dir() and any(not p.name.endswith(".lock") for p in folder.iterdir())


def check_before_run_spec(entry_name: str, entry_args: dict, scenarios_dir: str | os.PathLike) -> DataCheck:
    """Checks that must pass before HELM builds run specs (some run-spec functions download)."""
    if entry_name == "legalbench":
        missing = _missing_files("legalbench", entry_args, Path(scenarios_dir))
        if missing:
            return DataCheck(False, "legalbench fetches its prompt settings file while run specs are built, "
                                    f"which aborts an offline helm-run; missing {missing[0]}")
    if entry_name == "math" and not _has_files(Path(scenarios_dir) / "MATH" / "data"):
        return DataCheck(False, MATH_GONE)
    return DataCheck(True)


def _missing_files(scenario: str, args: dict, scenarios_dir: Path) -> list[str]:
    rule = REQUIRED_FILES.get(scenario)
    if rule is None:
        return []
    return [str(scenarios_dir / scenario / rel) for rel in rule(args) if not (scenarios_dir / scenario / rel).exists()]


def check_run_spec(scenario_name: str, scenario_args: dict, metric_class_names: list[str],
                   scenarios_dir: str | os.PathLike) -> DataCheck:
    """Is everything a run spec needs at run time present offline?"""
    scenarios_dir = Path(scenarios_dir)
    if any("summarization_metrics" in name for name in metric_class_names):
        return DataCheck(False, SUMMARIZATION_EXTRAS)
    if scenario_name in NO_DATA_NEEDED or scenario_name.startswith(NO_DATA_PREFIXES):
        return DataCheck(True)
    if scenario_name == "WMT_14":
        return DataCheck(True) if _hf_datasets_cache_has("wmt14") else DataCheck(False, WMT_NEEDS_HF_CACHE)
    if scenario_name in REQUIRED_FILES:
        missing = _missing_files(scenario_name, scenario_args, scenarios_dir)
        if missing:
            return DataCheck(False, f"no data for {scenario_name}: {missing[0]} is missing (pass --data-dir "
                                    f"with HELM's cache folder '{scenario_name}/')")
        return DataCheck(True)
    if not _has_files(scenarios_dir / scenario_name):
        return DataCheck(False, f"no data for {scenario_name}: HELM would download it and this run is offline; "
                                f"put HELM's cache folder '{scenario_name}/' under --data-dir")
    return DataCheck(True)


def _hf_datasets_cache_has(name: str) -> bool:
    root = Path(os.environ.get("HF_DATASETS_CACHE")
                or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "datasets")
    return root.is_dir() and any(name in p.name for p in root.iterdir())
