"""`manifest.json`: what produced an output folder (model, policy, versions, commit, command line).

Its *settings* are the part that changes results: the model and its files, the whole policy, the
seed, and which HELM runs were asked for (suite, run entries, instances, train trials). Two runs
into one folder must share them (harness.output refuses otherwise), and the default folder name
hashes them, so `--max-eval-instances 3` and `5` never land in one folder.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from engine.policy import Policy
from harness.helm.deployment import EngineSpec, checkpoint_fingerprint

PACKAGES = ("flexhelm", "crfm-helm", "torch", "transformers", "nltk")
SETTINGS = ("suite", "model", "model_files", "weights", "policy", "seed", "run_entries", "max_eval_instances",
            "num_train_trials")


def run_settings(spec: EngineSpec, suite: str, run_entries: list[str], max_eval_instances: int | None,
                 num_train_trials: int | None) -> dict:
    """The settings (module doc) of a harness run of `spec`, as the manifest records them."""
    return {"suite": suite, "model": spec.model, "model_files": checkpoint_fingerprint(spec.model),
            "weights": spec.weights, "policy": spec.policy, "seed": spec.seed, "run_entries": list(run_entries),
            "max_eval_instances": max_eval_instances, "num_train_trials": num_train_trials}


def settings_of(manifest: dict) -> dict:
    """The settings a manifest records; policy fields added since it was written take their defaults."""
    settings = {key: manifest.get(key) for key in SETTINGS}
    settings["policy"] = {**Policy().to_dict(), **(settings["policy"] or {})}
    return settings


def settings_hash(settings: list[dict]) -> str:
    """Short hash of the settings of every variant of a run, for default output folder names."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    repo = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def build_manifest(spec: EngineSpec, settings: dict, extra: dict) -> dict:
    return {
        **settings, "deployment": spec.deployment, "compression": spec.policy_obj.compression_label(),
        "load_options": spec.load, "packages": package_versions(), "git_commit": git_commit(),
        "python": sys.version.split()[0], "command_line": sys.argv,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra,
    }
