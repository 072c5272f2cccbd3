"""The GPU benchmark script runs its every step at tiny shapes on a CPU, so it is ready when a GPU is lent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from engine.bench import gpu_check

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_mode_writes_every_check(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/gpu_bench.py", "--cpu", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "gpu_bench.json").read_text())["rows"]
    in_memory = [r for r in rows if r["system"] == "engine vs HF generate"]
    assert [r["batch"] for r in in_memory] == [1, 4] and all(r["tok/s"] > 0 and r["peer tok/s"] > 0 for r in in_memory)
    eager = [r for r in rows if r["system"] == "engine --no-cuda-graphs vs HF generate"]
    assert [r["batch"] for r in eager] == [1, 4] and all(r["tok/s"] > 0 and "error" not in r for r in eager)
    offload = next(r for r in rows if r["system"] == "engine vs FlexGen 0.1.8")
    assert offload["engine"]["generated_tokens"] == 4 * 4 and offload["engine"]["peak_bytes"]["cpu"] > 0
    assert offload["flexgen"] == {"error": "FlexGen needs CUDA"}
    table = (tmp_path / "gpu_bench.md").read_text()
    assert "engine vs FlexGen 0.1.8" in table and "flexgen: FlexGen needs CUDA" in table


def test_the_compressed_cache_check_passes_here_and_prints_every_case(tiny_models, tmp_path, capsys):
    """The GPU script's 4-bit cache check, run on the CPU: prefill equals decode for every case it lists."""
    assert gpu_check.compressed_cache({"llama": tiny_models["llama"]}, tmp_path, device="cpu") == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| llama")]
    assert len(rows) == 3 * 2 * 2  # placements x key groupings x compute dtypes
