"""PNG plots of report and sweep tables (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import pandas as pd  # noqa: E402

CURVE_KEYS = ["model", "policy", "compression"]
OPTIONAL_CURVE_KEYS = ["device"]  # sweeps say where they ran; reports do not


def throughput_vs_batch(table: pd.DataFrame, path: str | Path, title: str = "Generation throughput",
                        lines: bool = True) -> Path:
    """Throughput against effective batch size, one curve per model, policy and compression.

    `table` needs effective_batch, tokens_per_s and the CURVE_KEYS columns: a sweep, or a report
    (lines=False there: its points are different scenarios, not one workload at several batch sizes).
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = table.dropna(subset=["effective_batch", "tokens_per_s"])
    keys_present = [k for k in OPTIONAL_CURVE_KEYS if k in points.columns] + CURVE_KEYS
    for keys, curve in points.groupby(keys_present, sort=True):
        curve = curve.sort_values("effective_batch")
        ax.plot(curve["effective_batch"], curve["tokens_per_s"], marker="o", linestyle="-" if lines else "none",
                label=" | ".join(str(k) for k in keys if str(k)))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("effective batch size (sequences)")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(points):
        ax.legend(fontsize=7)
    return _save(fig, path)


def accuracy_by_compression(comparison: pd.DataFrame, path: str | Path) -> Path:
    """Main metric uncompressed against compressed, per run entry, one bar pair each."""
    labels = comparison["entry"] + "\n" + comparison["compression"]
    x = range(len(comparison))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(comparison)), 4.5))
    ax.bar([i - 0.2 for i in x], comparison["value_uncompressed"], width=0.4, label="uncompressed")
    ax.bar([i + 0.2 for i in x], comparison["value_compressed"], width=0.4, label="compressed")
    ax.set_xticks(list(x), labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("main metric")
    ax.set_title("Accuracy with and without compression")
    ax.legend()
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
