"""notebooks/throughput_curves.ipynb runs headless (nbclient) on the committed reference results."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pandas as pd
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "throughput_curves.ipynb"


def test_notebook_plots_the_reference_sweep(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXHELM_RESULTS", str(ROOT / "results" / "reference"))
    monkeypatch.setenv("FLEXHELM_PLOTS", str(tmp_path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # kernel 'python3' runs sys.executable (jupyter_client swaps the spec's bare 'python' for it)
    NotebookClient(nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(ROOT)}}).execute()

    png = tmp_path / "throughput_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    # the sweep table the notebook shows has one row per row of the committed CSV
    tables = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    sweep_html = next(t for t in tables if "effective_batch" in t)
    rows = sweep_html.split("<tbody>")[1].count("<tr>")
    assert rows == len(pd.read_csv(ROOT / "results" / "reference" / "sweep.csv"))
