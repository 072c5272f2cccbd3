"""CPU attention beside a host KV cache, one decode step of one layer and one GPU batch: the engine
against FlexGen 0.1.8's own CPU attention path, in the same run, at OPT-30B head shapes by default.

Rows, each the median ms of one call (one new position per row, attending over `--keys` positions):
- engine: a real `LayerCache` on the cpu tier under `cpu_cache_compute`, in the storage dtype named.
  A call writes the new K and V into the cache in place and runs fused SDPA over the cache where it
  is; like the schedule, it passes no mask when no row is padded.
- FlexGen, mha_gen alone: the dense `cpu_cache_compute` branch of `TorchDevice.mha_gen` over FlexGen's
  fp32 attention workspace, the prefix already there. It writes the new K and V into the workspace,
  makes q fp32 and calls FlexGen's own `_attention_value` (bmm, masked softmax, bmm) on strided views.
  Every tensor is allocated and laid out by FlexGen's code: (positions, batch*heads, head_dim).
- FlexGen, whole path: the same with the copies FlexGen makes for it at every layer, batch and step:
  `load_cache` copies the fp16 prefix from its home into the fp32 workspace (FlexGen cannot attend over
  fp16 on a CPU), and `store_cache` writes the new position home. FlexGen runs those copies on a thread
  beside the GPU's work, but on the CPU's cores and memory bandwidth, which attention needs too.
- fused SDPA alone over contiguous fp16 and bf16 tensors: what this kernel costs with nothing around it.

The ratio columns are FlexGen's time over the row's: above 1 is faster than FlexGen. The FlexGen rows
need its wheel (engine.bench.flexgen_peer) and are left out, with a note, without it. With `--device
cuda`, q and the new K and V start on the GPU and the output returns there, for the engine and FlexGen alike.

    python -m engine.bench.attention                   # opt-30b heads (56 x 128), batch 8, 520 keys
    python -m engine.bench.attention --batch 2 --keys 64 --repeats 3
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.bench.flexgen_peer import find_wheel, load_flexgen
from engine.config import ModelConfig, named_config
from engine.errors import UserError, cli_main
from engine.flags import ArgumentParser
from engine.kv_cache import LayerCache
from engine.markdown import markdown_table
from engine.planner.measure import median_seconds
from engine.policy import DTYPES, Policy
from engine.runtime import Runtime
from engine.storage.tiers import make_tiers


@dataclass
class Step:
    """One decode step's inputs, as the engine's model code hands them to attention: q already scaled,
    (batch, 1, heads, head_dim) in the compute dtype on the compute device; the cached prefix as
    (batch, keys - 1, heads, head_dim); `allowed` (batch, 1, keys) False on left pads."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    prefix_k: torch.Tensor
    prefix_v: torch.Tensor
    allowed: torch.Tensor


def make_step(cfg: ModelConfig, batch: int, keys: int, device: torch.device, dtype: torch.dtype,
              pads: list[int] | None = None) -> Step:
    """Random inputs of `cfg`'s head shapes; row i has pads[i] left-padded positions (none by default)."""
    gen = torch.Generator().manual_seed(0)
    h, d = cfg.n_heads, cfg.head_dim

    def rand(s: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(batch, s, h, d, generator=gen) * scale).to(device, dtype)

    allowed = torch.ones(batch, 1, keys, dtype=torch.bool)
    for row, n in enumerate(pads or []):
        allowed[row, :, :n] = False
    return Step(rand(1, d**-0.5), rand(1), rand(1), rand(keys - 1), rand(keys - 1), allowed.to(device))


def cache_runtime(cfg: ModelConfig, policy: Policy, device: torch.device, compute: torch.dtype) -> Runtime:
    """A Runtime with what a KV cache reads (config, policy, device, dtypes, tiers, I/O pool) and no weights."""
    have = {"cfg": cfg, "policy": policy, "device": device, "compute_dtype": compute,
            "storage_dtype": DTYPES[policy.storage_dtype or "fp32"], "cache_quant": None,
            "tiers": make_tiers(device, None, None, None, None, False, device.type == "cuda"),
            "io": ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-io"),
            "specs": [], "weights": [], "plans": [], "working": [], "staging": []}
    needed = [f.name for f in dataclasses.fields(Runtime) if f.init and f.default is dataclasses.MISSING
              and f.default_factory is dataclasses.MISSING]
    return Runtime(**{name: have.get(name) for name in needed})


def engine_attention(cfg: ModelConfig, step: Step, storage: str) -> Callable[[], torch.Tensor]:
    """The engine's decode step over a `LayerCache` of `storage` on the cpu tier, attended on the CPU; the
    prefix is written by a prefill through the same cache. Each call rewinds one position and appends it
    again, so every call does the same work. Returns the output, (batch, 1, heads, head_dim)."""
    policy = Policy(gpu_batch_size=step.q.shape[0], cpu_cache_compute=True,
                    storage_dtype=storage).with_percent(100, 0, 0, 100, 100, 0)
    keys = step.allowed.shape[-1]
    rt = cache_runtime(cfg, policy, step.q.device, step.q.dtype)
    cache = LayerCache(rt, step.q.shape[0], keys)
    causal = torch.ones(keys - 1, keys - 1, dtype=torch.bool, device=step.q.device).tril()
    prefill = step.allowed[:, :, :-1] & causal
    cache.attend(cache.fetch(), prefill, step.prefix_k, step.prefix_k, step.prefix_v, 1.0)

    allowed = None if bool(step.allowed.all()) else step.allowed

    def call() -> torch.Tensor:
        cache.length = keys - 1
        return cache.attend(cache.fetch(), allowed, step.q, step.k, step.v, 1.0)

    return call


def flexgen_attention(cfg: ModelConfig, step: Step) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    """FlexGen 0.1.8's CPU attention for one decode step, its tensors made by its own code: mha_gen alone,
    and its whole path (load_cache's copy into the fp32 workspace, mha_gen, store_cache's write). Each
    returns the output, (batch, 1, heads, head_dim)."""
    load_flexgen()  # puts the unpacked wheel on sys.path and runs flex_opt's import-time set-up
    from flexgen.pytorch_backend import TorchDevice, TorchTensor, general_copy

    b, n_head, head_dim, src_s = step.q.shape[0], cfg.n_heads, cfg.head_dim, step.allowed.shape[-1]
    cpu = TorchDevice("cpu")
    # what the two functions below read of FlexGen's config, task and policy
    config = types.SimpleNamespace(n_head=n_head, input_dim=cfg.hidden)
    task = types.SimpleNamespace(prompt_len=src_s - 1, gen_len=2)
    policy = types.SimpleNamespace(gpu_batch_size=b, compress_cache=False, sep_layer=True)
    k_home, v_home = cpu.init_cache_one_gpu_batch(config, task, policy)  # (positions, b * n_head, head_dim) fp16
    cpu.init_attention_compute_workspace(config, task, policy)
    k_buf, v_buf = cpu.next_attention_compute_workspace()  # fp32, same layout

    def flex(x: torch.Tensor) -> torch.Tensor:  # mha_gen's (b, s, n_head, head_dim) -> (s, b * n_head, head_dim)
        return x.permute(1, 0, 2, 3).reshape(x.shape[1], b * n_head, head_dim).half()

    k_home.data[:src_s - 1] = flex(step.prefix_k)
    v_home.data[:src_s - 1] = flex(step.prefix_v)
    gpu = step.q.device if step.q.device.type == "cuda" else None
    q = step.q.half().permute(0, 2, 1, 3).reshape(b * n_head, 1, head_dim)
    k_new, v_new = flex(step.k), flex(step.v)
    mask = step.allowed[:, 0].cpu()  # FlexGen keeps the mask on the attention device
    prefix = (slice(0, src_s - 1), slice(0, b * n_head))
    new_pos = (slice(src_s - 1, src_s), slice(0, b * n_head))

    def load_cache() -> None:  # path 1: the fp16 prefix into the fp32 workspace
        general_copy(k_buf, prefix, k_home, prefix)
        general_copy(v_buf, prefix, v_home, prefix)

    load_cache()  # once at least: a workspace never written would be read as zero pages, flattering FlexGen

    def mha_gen() -> torch.Tensor:  # dense attention, cache on the CPU
        k, v = k_buf.data[:src_s], v_buf.data[:src_s]
        k[src_s - 1:src_s] = k_new
        v[src_s - 1:src_s] = v_new
        k = k.permute(1, 2, 0).reshape(b * n_head, head_dim, src_s)
        v = v.permute(1, 0, 2).reshape(b * n_head, src_s, head_dim)
        qq, k, v = q.float().cpu(), k.float(), v.float()
        value = cpu._attention_value(qq, k, v, mask, b, src_s, 1, n_head, head_dim)
        if gpu is not None:
            value = value.cuda().half()
        return value.transpose(1, 2)

    def whole_path() -> torch.Tensor:
        load_cache()
        value = mha_gen()
        general_copy(k_home, new_pos, TorchTensor.create_from_torch(k_new, cpu), None)  # store_cache
        general_copy(v_home, new_pos, TorchTensor.create_from_torch(v_new, cpu), None)
        return value

    return mha_gen, whole_path


def sdpa_floor(step: Step, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """Fused SDPA alone over contiguous (batch, heads, keys, head_dim) CPU tensors of `dtype`, no mask.
    Returns (batch, heads, 1, head_dim)."""
    q = step.q.transpose(1, 2).to("cpu", dtype)
    k, v = (torch.cat((p, x), dim=1).transpose(1, 2).to("cpu", dtype).contiguous()
            for p, x in ((step.prefix_k, step.k), (step.prefix_v, step.v)))
    return lambda: F.scaled_dot_product_attention(q, k, v, scale=1.0)  # q comes scaled, as OPT's and FlexGen's


FLEXGEN_PATH, FLEXGEN_MHA = "FlexGen: load_cache + mha_gen + store_cache", "FlexGen: mha_gen alone"
HEADER = ["path", "ms", "× FlexGen path", "× FlexGen mha_gen"]


def bench(cfg: ModelConfig, batch: int, keys: int, device: torch.device, storages: list[str], repeats: int,
          rounds: int, flexgen: bool) -> list[list[object]]:
    """Table rows (HEADER): each path's median ms, and FlexGen's times over it where FlexGen runs (above 1:
    faster than FlexGen). Paths take turns, `rounds` times, so a drifting machine slows each alike."""
    compute = torch.float32 if device.type == "cpu" else torch.float16
    step = make_step(cfg, batch, keys, device, compute)
    paths: dict[str, Callable[[], torch.Tensor]] = {f"engine, {s} cache": engine_attention(cfg, step, s)
                                                    for s in storages}
    if flexgen:
        paths[FLEXGEN_MHA], paths[FLEXGEN_PATH] = flexgen_attention(cfg, step)
    paths |= {f"fused SDPA over {s}, alone": sdpa_floor(step, DTYPES[s]) for s in ("fp16", "bf16")}
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            samples[name].append(median_seconds(fn, device, warmup=1, repeats=repeats))
    ms = {name: statistics.median(s) * 1e3 for name, s in samples.items()}
    return [[name, t, *(ms[peer] / t if peer in ms else None for peer in (FLEXGEN_PATH, FLEXGEN_MHA))]
            for name, t in ms.items()]


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m engine.bench.attention", description=__doc__)
    parser.add_argument("--model", default="opt-30b", help="named OPT config whose head shapes to use")
    parser.add_argument("--batch", type=int, default=8, help="rows of the GPU batch")
    parser.add_argument("--keys", type=int, default=520, help="positions attended, the new one included")
    parser.add_argument("--storage", default="fp16,bf16", help="the engine's cache dtypes, comma-separated")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where q, K, V come from")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: all cores)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per round (their median)")
    parser.add_argument("--rounds", type=int, default=3, help="turns each path takes (the median of rounds)")
    args = parser.parse_args(argv)
    storages = args.storage.split(",")
    if any(s not in DTYPES for s in storages):
        raise UserError(f"--storage takes {', '.join(DTYPES)}, comma-separated, got {args.storage!r}")
    if min(args.batch, args.repeats, args.rounds, args.threads or 1) < 1 or args.keys < 2:
        raise UserError("--batch, --repeats, --rounds and --threads must be positive and --keys at least 2")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda needs a CUDA device; none is available")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    cfg, wheel = named_config(args.model), find_wheel()
    if cfg.family != "opt":
        raise UserError(f"--model must be an OPT config, FlexGen's only family (no grouped KV heads), got {cfg.name}")
    rows = bench(cfg, args.batch, args.keys, torch.device(args.device), storages, args.repeats, args.rounds,
                 wheel is not None)
    print(f"{cfg.name}: {cfg.n_heads} heads x {cfg.head_dim}, batch {args.batch}, {args.keys} keys, 1 query; "
          f"q/K/V from {args.device}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"median of {args.rounds} rounds of {args.repeats} calls")
    print(markdown_table(HEADER, rows, floatfmt=".2f"))
    if wheel is None:
        print("FlexGen rows left out: its wheel (engine.bench.flexgen_peer) is not in ../shared/wheels")


if __name__ == "__main__":
    main()
