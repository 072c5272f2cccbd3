"""notebooks/throughput_curves.ipynb runs headless (nbclient) from the repository root and from notebooks/,
on the committed reference results and on a user's results in the layout harness.sweep and harness.run
write by default. It runs in a copy of the repository layout (pyproject.toml, notebooks/, results/), so
the plots it writes stay in tmp_path."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from engine.errors import UserError
from harness.report import locate

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = Path("notebooks") / "throughput_curves.ipynb"
REFERENCE = ROOT / "results" / "reference"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def repo(tmp_path) -> Path:
    """A repository root holding the notebook and the committed reference results."""
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    (tmp_path / "notebooks").mkdir()
    shutil.copy(ROOT / NOTEBOOK, tmp_path / NOTEBOOK)
    shutil.copytree(REFERENCE, tmp_path / "results" / "reference")
    return tmp_path


def _execute(repo: Path, cwd: Path, monkeypatch, results: str | None = None) -> list[dict]:
    """Run the notebook with the kernel started in `cwd`; return its outputs."""
    monkeypatch.delenv("FLEXHELM_PLOTS", raising=False)
    if results is None:
        monkeypatch.delenv("FLEXHELM_RESULTS", raising=False)
    else:
        monkeypatch.setenv("FLEXHELM_RESULTS", results)
    nb = nbformat.read(repo / NOTEBOOK, as_version=4)
    # kernel 'python3' runs sys.executable (jupyter_client swaps the spec's bare 'python' for it)
    NotebookClient(nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(cwd)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    return outputs


def _table_rows(outputs: list[dict], column: str) -> int:
    """Rows of the first HTML table the notebook showed that has `column`."""
    html = next(o["data"]["text/html"] for o in outputs if column in o.get("data", {}).get("text/html", ""))
    return html.split("<tbody>")[1].count("<tr>")


@pytest.mark.parametrize("start", [".", "notebooks"], ids=["from-root", "from-notebooks"])
def test_notebook_plots_the_reference_from_root_and_notebooks(repo, monkeypatch, start):
    outputs = _execute(repo, repo / start, monkeypatch)
    assert (repo / "results" / "plots" / "throughput_curves.png").read_bytes()[:8] == PNG_MAGIC
    assert not (repo / "notebooks" / "results").exists()
    assert _table_rows(outputs, "effective_batch") == len(pd.read_csv(REFERENCE / "sweep.csv"))
    assert _table_rows(outputs, "eval_instances") == 6  # 3 entries, uncompressed and w4c4


def _user_results(repo: Path) -> Path:
    """results/ as `harness.sweep` (results/sweep/sweep.csv) and two `harness.run` calls (results/smoke/<run>/,
    the older a --compare-compression output) leave it."""
    results = repo / "results"
    (results / "sweep").mkdir()
    pd.read_csv(REFERENCE / "sweep.csv").head(3).to_csv(results / "sweep" / "sweep.csv", index=False)
    older = shutil.copytree(REFERENCE / "smoke", results / "smoke" / "smollm2-135m-compare-n5-00000000")
    newer = shutil.copytree(REFERENCE / "smoke" / "none", results / "smoke" / "smollm2-135m-none-n5-11111111")
    for manifest in older.glob("*/manifest.json"):
        os.utime(manifest, (0, 0))
    assert (newer / "manifest.json").is_file()
    return results


def test_notebook_plots_a_users_own_results(repo, monkeypatch):
    results = _user_results(repo)
    outputs = _execute(repo, repo / "notebooks", monkeypatch, results="results")  # relative to the root
    assert _table_rows(outputs, "effective_batch") == 3
    assert _table_rows(outputs, "eval_instances") == 3  # the newest run: one variant of 3 entries
    assert (results / "plots" / "throughput_curves.png").read_bytes()[:8] == PNG_MAGIC


def test_locate_reads_both_layouts_and_names_what_is_missing(repo):
    reference = repo / "results" / "reference"
    assert locate.sweep_csv(reference) == reference / "sweep.csv"
    assert locate.run_output(reference) == reference / "smoke"  # a --compare-compression output
    results = _user_results(repo)
    assert locate.sweep_csv(results) == results / "sweep" / "sweep.csv"
    assert locate.run_output(results).name == "smollm2-135m-none-n5-11111111"
    for manifest in (results / "smoke").glob("*compare-n5*/*/manifest.json"):
        os.utime(manifest, (2e9, 2e9))  # the compare output is rewritten later
    assert locate.run_output(results).name == "smollm2-135m-compare-n5-00000000"
    with pytest.raises(UserError, match="no sweep table"):
        locate.sweep_csv(repo / "notebooks")
    with pytest.raises(UserError, match="no harness.run output"):
        locate.run_output(repo / "notebooks")
