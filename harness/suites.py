"""Suites are HELM run-entry conf files under `scenarios/`; this module reads them and binds
run entries without a concrete model (`model=text`, `model=text_code`, or none) to our deployment."""

from __future__ import annotations

from pathlib import Path

from helm.benchmark.presentation.run_entry import RunEntry, read_run_entries
from helm.common.object_spec import parse_object_spec

from engine.errors import UserError

SUITES_DIR = Path(__file__).resolve().parent.parent / "scenarios"
CUSTOM_SUITE = "custom"


def available_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.conf"))


def suite_conf_path(suite: str) -> Path:
    """A suite name (`smoke`) or a path to a run-entry conf file."""
    path = Path(suite)
    if path.suffix == ".conf" or path.exists():
        if not path.is_file():
            raise UserError(f"suite conf {path} does not exist; pass a suite name "
                            f"({', '.join(available_suites())}) or a conf file")
        return path
    path = SUITES_DIR / f"{suite}.conf"
    if not path.is_file():
        raise UserError(f"unknown suite {suite!r}; use one of {', '.join(available_suites())} or a conf path")
    return path


def load_run_entries(suite: str | None, run_entries: list[str]) -> tuple[str, list[RunEntry]]:
    """(suite name, run entries) from --suite and --run-entries."""
    entries: list[RunEntry] = []
    name = CUSTOM_SUITE
    if suite:
        path = suite_conf_path(suite)
        name = path.stem
        try:
            entries.extend(read_run_entries([str(path)]).entries)
        except Exception as err:
            raise UserError(f"cannot read suite {path}: {err}") from None
    entries.extend(RunEntry(description=d, priority=1, groups=None) for d in run_entries)
    if not entries:
        raise UserError("nothing to run: pass --suite NAME (e.g. smoke) or --run-entries 'mmlu:subject=anatomy'")
    return name, entries


def bind_model(entry: RunEntry, deployment: str) -> RunEntry:
    """Run entries without a concrete model (no `/` in `model=`) run on `deployment`."""
    spec = parse_object_spec(entry.description)
    if "/" in str(spec.args.get("model", "")):
        return entry
    args = {**spec.args, "model": deployment}
    description = f"{spec.class_name}:" + ",".join(f"{k}={v}" for k, v in args.items())
    return RunEntry(description=description, priority=entry.priority, groups=entry.groups)
