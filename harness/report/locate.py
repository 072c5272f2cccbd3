"""Find the sweep table and the smoke-suite run output inside one results folder, in either layout.

The notebook takes one folder (FLEXHELM_RESULTS) and plots the committed reference and a user's
own results alike, so it accepts both layouts:
- the reference layout (results/reference, or the README's `--output results/mine/...` commands):
  `R/sweep.csv` and `R/smoke/`, one harness.run output (plain or --compare-compression);
- the default layout of harness.sweep and harness.run (R = results): `R/sweep/sweep.csv` and
  `R/smoke/<model>-<compression>-n<instances>-<hash>/`, of which the newest output is taken.
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import UserError
from harness.files import read_json

SUITE = "smoke"


def sweep_csv(root: Path) -> Path:
    """`root/sweep.csv`, else `root/sweep/sweep.csv` (where harness.sweep writes by default)."""
    for path in (root / "sweep.csv", root / "sweep" / "sweep.csv"):
        if path.is_file():
            return path
    raise UserError(f"{root} holds no sweep table (sweep.csv or sweep/sweep.csv); make one with python -m "
                    "harness.sweep, or point FLEXHELM_RESULTS at a folder that has one")


def _manifests(folder: Path) -> list[Path]:
    return [m for m in (folder / "manifest.json", *folder.glob("*/manifest.json")) if m.is_file()]


def _is_output(folder: Path) -> bool:
    """A harness.run output: a manifest at the top, or (--compare-compression) in folders named after
    their compression label, which tells it apart from a folder of several outputs."""
    if (folder / "manifest.json").is_file():
        return True
    variants = _manifests(folder)
    return bool(variants) and all(m.parent.name == read_json(m).get("compression") for m in variants)


def run_output(root: Path, suite: str = SUITE) -> Path:
    """`root/<suite>` when it is one harness.run output, else the newest output folder inside it."""
    folder = root / suite
    if _is_output(folder):
        return folder
    outputs = [p for p in folder.iterdir() if p.is_dir() and _is_output(p)] if folder.is_dir() else []
    if not outputs:
        raise UserError(f"{folder} holds no harness.run output; run python -m harness.run --suite {suite}, "
                        "or point FLEXHELM_RESULTS at a folder that has one")
    return max(outputs, key=lambda p: max(m.stat().st_mtime for m in _manifests(p)))
