"""`manifest.json`: what produced an output folder (model, policy, versions, commit, command line)."""

from __future__ import annotations

import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from harness.helm.deployment import EngineSpec

PACKAGES = ("flexhelm", "crfm-helm", "torch", "transformers", "nltk")


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


def build_manifest(spec: EngineSpec, suite: str, extra: dict) -> dict:
    policy = spec.policy_obj
    return {
        "suite": suite, "model": spec.model, "deployment": spec.deployment, "weights": spec.weights,
        "policy": spec.policy, "compression": policy.compression_label(), "seed": spec.seed,
        "load_options": spec.load, "config_hash": spec.config_hash(),
        "packages": package_versions(), "git_commit": git_commit(),
        "python": sys.version.split()[0], "command_line": sys.argv,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra,
    }
