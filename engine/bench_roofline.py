"""This machine's roofline, measured in the same benchmark run: fp32 GEMM FLOP/s and disk bandwidth.

Throughput figures mean little across machines; as a fraction of what this CPU and this disk
can do at best, they do. The compute bound of a generation run is gen·F / (2·P·(prompt+gen))
tokens/s (every token of every row costs 2·P FLOPs; attention is ignored); a run whose weights
stream from disk is also bounded by the disk: each forward pass reads its disk bytes again.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import time
from pathlib import Path

CHUNK = 16 * 2**20


def compute_bound_tokens_per_s(flops: float, params: int, prompt_len: int, gen_len: int) -> float:
    """Generated tokens/s if every FLOP ran at `flops`: gen·F / (2·P·(prompt+gen)), per row and batch."""
    return gen_len * flops / (2 * params * (prompt_len + gen_len))


def disk_bound_tokens_per_s(disk_bw: float, bytes_per_forward: float, batch: int) -> float:
    """Generated tokens/s if each forward pass (one token for `batch` rows) only waited for its reads."""
    return float("inf") if bytes_per_forward <= 0 else batch * disk_bw / bytes_per_forward


def measure_gemm_flops(threads: int, m: int = 1024, k: int = 2048, n: int = 8192, repeats: int = 5) -> float:
    """Best fp32 GEMM FLOP/s of `repeats` timed [m,k]@[k,n] products (OPT-1.3B FFN-sized by default)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.mm(a, b)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return 2 * m * k * n / best


def measure_disk_read_bandwidth(folder: Path, size: int = 1 << 30) -> tuple[float, str]:
    """Sequential read bandwidth (bytes/s) of the disk under `folder`, bypassing the page cache.

    Writes a probe file once and reads it with O_DIRECT; where O_DIRECT is refused it evicts the
    file from the cache (fadvise) and reads it buffered. Returns (bandwidth, method).
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "disk_probe.bin"
    if not path.is_file() or path.stat().st_size != size:
        block = os.urandom(CHUNK)
        with open(path, "wb") as f:
            for _ in range(size // CHUNK):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
    buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
    try:
        fd, method = os.open(path, os.O_RDONLY | os.O_DIRECT), "O_DIRECT"
    except OSError:
        fd, method = os.open(path, os.O_RDONLY), "buffered after fadvise DONTNEED"
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    try:
        start, done = time.perf_counter(), 0
        while done < size:
            got = os.preadv(fd, [buf], done)
            if got <= 0:
                break
            done += got
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
        with contextlib.suppress(Exception):
            buf.close()
    return done / elapsed, method
