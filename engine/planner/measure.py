"""Measure this machine for the cost model and write a hardware profile.

Measures GEMM FLOP/s per dtype, memory bandwidth (copy and weight-streaming matmul), attention
rates at prefill and decode shapes (the engine's own SDPA call), dequantisation with the engine's
codec, host<->device bandwidth when a GPU exists, and disk read/write bandwidth with O_DIRECT so the
page cache cannot flatter the disk tier. Each figure is the median of a few timed repeats.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from engine import Engine
from engine.errors import UserError
from engine.models.layers import attention
from engine.planner.hardware import (
    PRESET_DIR,
    HardwareProfile,
    local_cache,
    preset_names,
    read_profile,
    write_profile,
)
from engine.policy import DTYPES
from engine.quant.groupwise import QuantSpec, decode_rows, encode_rows
from engine.storage.host_memory import available_ram
from engine.storage.tiers import DiskTier


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeats: int = 3,
                   min_s: float = 0.0) -> float:
    """Median seconds per call after `warmup` calls, a GPU synchronized around each; each repeat calls
    `fn` until at least `min_s` has passed, so that short calls are not timed by the clock's resolution."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= min_s:
                break
        samples.append(elapsed / calls)
    return statistics.median(samples)


def gemm_flops(device: torch.device, dtype: torch.dtype, m: int, k: int, n: int) -> float:
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    return 2 * m * k * n / median_seconds(lambda: a @ b, device, min_s=0.2)


def weight_stream_bw(device: torch.device, dtype: torch.dtype, rows: int, size: int) -> float:
    """Bytes/s of a skinny matmul whose weight is far larger than any cache: decode's bound."""
    w = torch.randn(size, size, device=device).to(dtype)
    x = torch.randn(rows, size, device=device).to(dtype)
    return w.numel() * w.element_size() / median_seconds(lambda: torch.nn.functional.linear(x, w), device, min_s=0.2)


def copy_bw(src: torch.Tensor, dst: torch.Tensor) -> float:
    device = src.device if src.device.type == "cuda" else dst.device
    seconds = median_seconds(lambda: dst.copy_(src, non_blocking=True), device, min_s=0.2)
    return src.numel() * src.element_size() / seconds


def attention_flops(device: torch.device, dtype: torch.dtype, batch: int, heads: int, q_len: int,
                    kv_len: int, head_dim: int = 64) -> float:
    """FLOP/s of the engine's attention, counted as FlexGen does: 4 * q_len * kv_len * hidden per row."""
    q = torch.randn(batch, q_len, heads, head_dim, device=device).to(dtype)
    k = torch.randn(batch, kv_len, heads, head_dim, device=device).to(dtype)
    v = torch.randn_like(k)
    allowed = torch.ones(batch, q_len, kv_len, dtype=torch.bool, device=device)
    seconds = median_seconds(lambda: attention(q, k, v, allowed, head_dim**-0.5), device, min_s=0.2)
    return 4 * batch * q_len * kv_len * heads * head_dim / seconds


def dequant_bw(device: torch.device, dtype: torch.dtype, rows: int, width: int = 4096) -> float:
    """Decompressed bytes per second of the engine's 4-bit group codec."""
    spec = QuantSpec(4, 64)
    data = encode_rows(torch.randn(rows, width, device=device), spec)
    elem = dtype.itemsize
    return rows * width * elem / median_seconds(lambda: decode_rows(data, width, spec, dtype), device, min_s=0.2)


def disk_bw(folder: Path, nbytes: int, chunk: int = 32 << 20) -> tuple[float, float, bool]:
    """(read, write) bytes/s of the engine's own disk tier with O_DIRECT reads, and whether O_DIRECT held.

    Reads go through `DiskStore.read` as the engine's do (tensor-sized, into fresh aligned buffers),
    so the figure includes what the engine pays beyond the device; writes are synced to the device.
    """
    tier = DiskTier(folder, None, direct_io=True)
    try:
        nbytes = max(chunk, nbytes // chunk * chunk)
        store = tier.store(nbytes, "probe")
        data = torch.randint(0, 255, (chunk,), dtype=torch.uint8)
        start = time.perf_counter()
        for offset in range(0, nbytes, chunk):
            store.write(offset, data)
        os.fsync(store.fd)
        write = nbytes / (time.perf_counter() - start)
        os.posix_fadvise(store.fd, 0, nbytes, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        for offset in range(0, nbytes, chunk):
            store.read(offset, chunk)
        read = nbytes / (time.perf_counter() - start)
        direct = store.rfd != store.fd
        store.close()
    finally:
        tier.close()
    return read, write, direct


def layer_overhead(device: torch.device) -> float:
    """Seconds per layer per GPU batch of the engine on a toy OPT whose math costs next to nothing."""
    toy = {"model_type": "opt", "hidden_size": 64, "num_hidden_layers": 8, "num_attention_heads": 4,
           "ffn_dim": 256, "vocab_size": 512, "max_position_embeddings": 128, "do_layer_norm_before": True}
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(toy))
        try:
            eng = Engine.load(folder, weights="dummy", device=device.type, offload_dir=folder)
        except UserError as err:  # e.g. no tokenizer to borrow: price the math alone
            print(f"engine overhead not measured ({err}); using 0", flush=True)
            return 0.0
        with eng:
            eng.generate([[5, 6, 7, 8]], max_new_tokens=4)  # warm-up
            steps = 33
            eng.generate([[5, 6, 7, 8]], max_new_tokens=steps)
            return eng.stats.decode_s / ((steps - 1) * (toy["num_hidden_layers"] + 2))


def measure(offload_dir: str | os.PathLike | None = None, disk_bytes: int = 512 << 20,
            quick: bool = False) -> HardwareProfile:
    """Measure this machine: the GPU if there is one, else the CPU as the compute device.

    `quick` times only the compute dtype's GEMM: enough to re-price a policy on a shared machine
    whose speed drifts between runs.
    """
    gpu = torch.cuda.is_available()
    dev = torch.device("cuda" if gpu else "cpu")
    compute = torch.float16 if gpu else torch.float32
    host = torch.device("cpu")
    folder = Path(offload_dir or tempfile.gettempdir())
    big = 8192 if gpu else 2048  # a CPU needs ~0.2 s per 2048^3 fp32 GEMM; keep the whole run short
    raw: dict[str, float] = {}
    steps: list[tuple[str, Callable[[], float]]] = []
    for name, dtype in DTYPES.items():
        if quick and dtype != compute:
            continue
        size = big if (gpu or dtype == torch.float32) else 256  # half precision crawls on CPUs
        steps.append((f"gemm_{name}_tflops", lambda d=dtype, s=size: gemm_flops(dev, d, s, s, s) / 1e12))
    steps += [
        ("gemm_decode_tflops", lambda: gemm_flops(dev, compute, 64, 4096, 4096) / 1e12),
        ("weight_stream_gbs", lambda: weight_stream_bw(dev, compute, 4, 16384 if gpu else 8192) / 1e9),
        ("host_memcpy_gbs", lambda: copy_bw(torch.empty(256 << 20, dtype=torch.uint8),
                                            torch.empty(256 << 20, dtype=torch.uint8)) / 1e9),
        ("attn_prefill_tflops", lambda: attention_flops(dev, compute, 4, 32, 512, 512) / 1e12),
        ("attn_decode_tflops", lambda: attention_flops(dev, compute, 32, 32, 1, 512) / 1e12),
        ("cpu_attn_decode_tflops", lambda: attention_flops(host, torch.float32, 32, 32, 1, 512) / 1e12),
        ("dequant_gbs", lambda: dequant_bw(dev, compute, 8192 if gpu else 512) / 1e9),
        ("cpu_dequant_gbs", lambda: dequant_bw(host, torch.float32, 512) / 1e9),
    ]
    if gpu:
        pinned = torch.empty(512 << 20, dtype=torch.uint8, pin_memory=True)
        on_dev = torch.empty(512 << 20, dtype=torch.uint8, device=dev)
        steps += [("h2d_pinned_gbs", lambda: copy_bw(pinned, on_dev) / 1e9),
                  ("d2h_pinned_gbs", lambda: copy_bw(on_dev, pinned) / 1e9),
                  ("d2h_pageable_gbs", lambda: copy_bw(on_dev, torch.empty(512 << 20, dtype=torch.uint8)) / 1e9),
                  ("device_copy_gbs", lambda: 2 * copy_bw(on_dev, torch.empty_like(on_dev)) / 1e9)]
    for name, step in tqdm(steps, desc="profiling", unit="test", leave=False):
        raw[name] = round(step(), 6)
    raw["layer_overhead_ms"] = round(layer_overhead(dev) * 1e3, 4)
    read, write, direct = disk_bw(folder, disk_bytes)
    raw.update(disk_read_gbs=round(read / 1e9, 4), disk_write_gbs=round(write / 1e9, 4), disk_o_direct=direct)
    host_bw = raw["host_memcpy_gbs"] * 1e9
    to_dev = raw.get("h2d_pinned_gbs", raw["host_memcpy_gbs"]) * 1e9
    to_host = raw.get("d2h_pinned_gbs", raw["host_memcpy_gbs"]) * 1e9
    ram = available_ram()
    return HardwareProfile(
        name="local", device=dev.type,
        gpu_mem=torch.cuda.mem_get_info(dev)[0] if gpu else ram, cpu_mem=ram,
        disk_mem=shutil.disk_usage(folder).free,
        ctog_bw=to_dev, gtoc_cache_bw=to_host, gtoc_act_bw=to_host,
        dtoc_bw=read, ctod_cache_bw=write, ctod_bw=write,
        gpu_mem_bw=raw["weight_stream_gbs"] * 1e9,
        mm_prefill_flops=raw[f"gemm_{'fp16' if gpu else 'fp32'}_tflops"] * 1e12,
        mm_decode_flops=raw["gemm_decode_tflops"] * 1e12,
        bmm_prefill_flops=raw["attn_prefill_tflops"] * 1e12,
        bmm_decode_flops=raw["attn_decode_tflops"] * 1e12,
        cpu_attn_flops=raw["cpu_attn_decode_tflops"] * 1e12,
        dequant_bw=raw["dequant_gbs"] * 1e9, cpu_dequant_bw=raw["cpu_dequant_gbs"] * 1e9,
        layer_overhead_s=raw["layer_overhead_ms"] / 1e3,
        notes=(f"measured by engine.profile with torch {torch.__version__}, {torch.get_num_threads()} threads"
               f"{', ' + torch.cuda.get_device_name(dev) if gpu else ', no GPU'}; disk at {folder}"
               f"{'' if direct else ' (no O_DIRECT there: reads may hit the page cache)'}; "
               f"host memcpy {host_bw / 1e9:.1f} GB/s"),
        measured=raw)


def load_hardware(name_or_path: str | Path) -> HardwareProfile:
    """A preset by name, "local" (this machine, measured and cached on first use) or a JSON path."""
    key = str(name_or_path)
    if key == "local":
        cached = local_cache()
        if not cached.is_file():
            print(f"measuring this machine once for the cost model (about a minute); cached in {cached}",
                  file=sys.stderr, flush=True)
            write_profile(measure(), cached)
        return read_profile(cached)
    if key in preset_names():
        return read_profile(PRESET_DIR / f"{key}.json")
    if Path(key).expanduser().is_file():
        return read_profile(Path(key).expanduser())
    raise UserError(f"unknown hardware {key!r}; use 'local', a profile JSON path, or one of: "
                    + ", ".join(preset_names()))
