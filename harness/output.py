"""Output folders of `harness.run`: their default names, and never mixing runs of other settings.

A folder's runs, manifest and report describe one set of settings (harness.manifest). Writing
runs of other settings into it would replace some runs and leave others, and the report would
label them all with the new manifest; so that is refused in one line before anything is written,
unless --overwrite says to delete the old folder first. Identical settings go on as before: the
request cache answers what was computed, and --resume skips finished runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from engine.errors import UserError
from harness.manifest import settings_hash, settings_of

RESULTS_DIR = Path("results")


def default_output(suite: str, slug: str, label: str, settings: list[dict]) -> Path:
    """`results/<suite>/<model>-<compression>[-n<instances>]-<hash of the settings>`."""
    instances = settings[0]["max_eval_instances"]
    shown = f"-n{instances}" if instances is not None else ""
    return RESULTS_DIR / suite / f"{slug}-{label}{shown}-{settings_hash(settings)}"


def _differences(old: dict, new: dict) -> str:
    old, new = settings_of(old), settings_of(new)
    changed = [k for k in new if old[k] != new[k]]
    return ", ".join(f"{k} {old[k]} -> {new[k]}" if not isinstance(new[k], dict | list) else k for k in changed)


def prepare_output(output: Path, planned: dict[Path, dict], overwrite: bool) -> None:
    """Refuse (UserError) an `output` that is a file, or that holds runs of other settings than
    `planned` (folder -> settings of the run written there); with `overwrite`, delete those first."""
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; pass a folder (new or from an earlier run) as --output")
    existing = [output / "manifest.json", *output.glob("*/manifest.json")] if output.is_dir() else []
    for manifest in (m for m in existing if m.is_file()):
        folder = manifest.parent
        try:
            old = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            old = {}
        if folder in planned:
            why = _differences(old, planned[folder])
            if not why:
                continue
        else:
            why = f"{folder} is a run of another layout, with or without --compare-compression"
        if overwrite:
            print(f"deleting {output}: it holds runs of other settings (--overwrite)", flush=True)
            shutil.rmtree(output)
            return
        raise UserError(f"--output {output} holds runs made with other settings ({why}); pass a new --output, "
                        "or --overwrite to delete it first")
