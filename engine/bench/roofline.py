"""This machine's roofline, measured in the same benchmark run: fp32 GEMM FLOP/s and disk bandwidth.

Throughput figures mean little across machines; as a fraction of what this CPU and this disk
can do at best, they do. The compute bound of a generation run is gen·F / (2·P·(prompt+gen))
tokens/s (every token of every row costs 2·P FLOPs; attention is ignored); a run whose weights
stream from disk is also bounded by the disk: each forward pass reads its disk bytes again.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from engine.planner.measure import disk_bw, gemm_flops


def compute_bound_tokens_per_s(flops: float, params: int, prompt_len: int, gen_len: int) -> float:
    """Generated tokens/s if every FLOP ran at `flops`: gen·F / (2·P·(prompt+gen)), per row and batch."""
    return gen_len * flops / (2 * params * (prompt_len + gen_len))


def disk_bound_tokens_per_s(disk_bw: float, disk_bytes: float, tokens: float) -> float:
    """Tokens/s of a run that generated `tokens` if it only waited for its `disk_bytes` of reads."""
    return float("inf") if disk_bytes <= 0 else tokens * disk_bw / disk_bytes


def measure_gemm(threads: int, cpus: set[int]) -> float:
    """fp32 GEMM FLOP/s on the OPT-1.3B FFN shape, pinned like the runs."""

    affinity, torch_threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(threads)
    try:
        return gemm_flops(torch.device("cpu"), torch.float32, 1024, 2048, 8192)
    finally:
        os.sched_setaffinity(0, affinity)
        torch.set_num_threads(torch_threads)


def measure_roofline(threads: int, cpus: set[int], disk_folder: Path, disk_bytes: int = 1 << 30) -> dict:
    """fp32 GEMM FLOP/s and O_DIRECT disk read bytes/s, with the hardware profiler's probes (so the
    benchmark and the cost model measure alike). The benchmark probes the GEMM again before every
    run (`gemm_probes`) and takes the best: a shared machine's speed drifts by tens of percent."""
    flops = measure_gemm(threads, cpus)
    read_bw, _, direct = disk_bw(disk_folder, disk_bytes)
    return {"gemm_flops": flops, "gemm_probes": [flops], "disk_read_bw": read_bw,
            "disk_method": "O_DIRECT" if direct else "buffered after fadvise DONTNEED"}
