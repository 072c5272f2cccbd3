"""FlexGen's cost model: per-layer time as the max of I/O and compute terms, and peak memory per tier.

Once the block shape (gpu_batch_size x num_gpu_batches), `cpu_cache_compute`, `overlap` and
compression are fixed, every term is linear in the nine placement fractions (weights, cache and
activations on gpu/cpu/disk). So one set of expressions serves both `predict` (evaluate them at a
policy's fractions) and the search's linear program (engine.search hands them to scipy). Stage times
are nested max/sum of linear terms, which the LP linearises with one auxiliary variable per max.

Time of one decoder layer for the whole block (a layer's weights are loaded once per block):

    prefill: max(ctog + dtoc, gtoc + ctod, compute)       reads, writes and compute overlap
    decode:  ctog + max(gtoc, dtoc, ctod, compute)        FlexGen's fitted form: weight upload
                                                          does not hide behind decode compute
    CPU-only machine: max(dtoc + ctod, compute)           no transfers; disk reads on an I/O thread
    (overlap off: the sum of all terms)

Compute on the device is a roofline per GPU batch, max(FLOPs / matmul rate, weight bytes / memory
bandwidth) on a GPU and their sum on a CPU, plus attention (batched matmul on the device, or on the
CPU next to a host-memory cache with `cpu_cache_compute`) and dequantisation of compressed weights
and cache.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from engine import memory
from engine.config import ModelConfig
from engine.models.registry import adapter_for
from engine.placement import split_count
from engine.planner.hardware import HardwareProfile
from engine.policy import TIERS, Policy
from engine.quant.groupwise import QuantSpec, row_nbytes, weight_nbytes

FRACTIONS = ("wg", "wc", "wd", "cg", "cc", "cd", "hg", "hc", "hd")

_DTYPE_BYTES = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2}


# -- linear expressions over the placement fractions ---------------------------------------------

class Lin:
    """const + sum(coef[i] * x[i]); indices 0..8 are FRACTIONS, higher ones are LP auxiliaries."""

    __slots__ = ("const", "coef")

    def __init__(self, const: float = 0.0, coef: dict[int, float] | None = None) -> None:
        self.const = float(const)
        self.coef = coef or {}

    def __add__(self, other: Lin | float) -> Lin:
        if not isinstance(other, Lin):
            return Lin(self.const + other, dict(self.coef))
        coef = dict(self.coef)
        for i, c in other.coef.items():
            coef[i] = coef.get(i, 0.0) + c
        return Lin(self.const + other.const, coef)

    __radd__ = __add__

    def __mul__(self, k: float) -> Lin:
        return Lin(self.const * k, {i: c * k for i, c in self.coef.items()})

    __rmul__ = __mul__

    def __truediv__(self, k: float) -> Lin:
        return self * (1.0 / k)

    def value(self, x: list[float]) -> float:
        return self.const + sum(c * x[i] for i, c in self.coef.items())


def frac(*names: str) -> Lin:
    """Sum of placement fractions, e.g. frac("wc", "wd") is the share of weights off the device."""
    return Lin(0.0, {FRACTIONS.index(n): 1.0 for n in names})


@dataclass(frozen=True)
class Max:
    parts: tuple


@dataclass(frozen=True)
class Sum:
    parts: tuple


@dataclass(frozen=True)
class Scale:
    """`times` copies of an expression (e.g. one per layer), linearised once."""

    times: float
    expr: object


Expr = Lin | Max | Sum | Scale


def evaluate(expr: Expr, x: list[float]) -> float:
    if isinstance(expr, Lin):
        return expr.value(x)
    if isinstance(expr, Scale):
        return expr.times * evaluate(expr.expr, x)
    values = [evaluate(p, x) for p in expr.parts]
    return max(values) if isinstance(expr, Max) else sum(values)


# -- sizes ----------------------------------------------------------------------------------------

def compressed_nbytes(shape: tuple[int, ...], bits: int, group: int, dim: int = 0) -> int:
    """Bytes of a 4-bit (or other) group-quantised tensor; rows of a 1-D/3-D tensor are its last dim."""
    spec = QuantSpec(bits, group)
    if len(shape) == 2:
        return weight_nbytes(shape, spec, dim)
    rows = math.prod(shape[:-1])
    return rows * row_nbytes(shape[-1], spec)


def element_bytes(policy: Policy, device: str) -> tuple[int, int]:
    """(storage, compute) bytes per element: fp16 on a GPU and fp32 on a CPU unless the policy says."""
    default = 2 if device == "cuda" else 4
    compute = _DTYPE_BYTES[policy.compute_dtype] if policy.compute_dtype else default
    storage = _DTYPE_BYTES[policy.storage_dtype] if policy.storage_dtype else compute
    return storage, compute


@dataclass(frozen=True)
class LayerSizes:
    """What one layer stores, moves and computes; the embedding and head together form one extra layer."""

    weight_bytes: float  # as stored (compressed or not)
    weight_read_bytes: float  # what the matmuls stream from device memory per GPU batch
    weight_full_bytes: float  # dequantised size: the output of decompression
    flops_per_token: float  # dense matmul FLOPs per token
    elem_bytes: int  # compute dtype: activations and dequantised data
    hidden: int = 0  # activation elements per token passed between layers
    kv_elems: int = 0  # KV-cache elements per token
    kv_bytes: float = 0.0  # stored KV-cache bytes per token
    attn_dim: int = 0  # query heads x head_dim
    ffn: int = 0
    engine_layers: int = 1  # engine layers this stands for (embedding and head are two)

    @property
    def hidden_bytes(self) -> float:
        return self.hidden * self.elem_bytes


def model_sizes(cfg: ModelConfig, policy: Policy, device: str) -> tuple[LayerSizes, LayerSizes]:
    """(decoder layer, embedding + head) sizes under the policy's dtypes and compression."""
    store, comp = element_bytes(policy, device)
    weight_comp = (policy.comp_weight_bits, policy.comp_weight_group, policy.comp_weight_dim)
    cache_comp = (policy.comp_cache_bits, policy.comp_cache_group)
    return _model_sizes(cfg, store, comp, weight_comp if policy.compress_weight else None,
                        cache_comp if policy.compress_cache else None)


@functools.lru_cache(maxsize=256)
def _model_sizes(cfg: ModelConfig, store: int, comp: int, weight_comp: tuple[int, int, int] | None,
                 cache_comp: tuple[int, int] | None) -> tuple[LayerSizes, LayerSizes]:
    specs = adapter_for(cfg).layer_specs(cfg)

    def weights(shapes: list[tuple[int, ...]]) -> tuple[float, float, float, int]:
        stored = full = 0.0
        mats = 0
        for shape in shapes:
            n = math.prod(shape)
            full += n * comp
            if len(shape) == 2:
                mats += n
            stored += compressed_nbytes(shape, *weight_comp) if weight_comp and len(shape) == 2 else n * store
        return stored, (full if weight_comp else stored), full, mats

    decoder = next(s for s in specs if s.kind == "decoder")
    w_st, w_read, w_full, mats = weights(list(decoder.shapes.values()))
    kv_dim = cfg.kv_heads * cfg.head_dim
    kv_row = compressed_nbytes((kv_dim,), *cache_comp) if cache_comp else kv_dim * store
    layer = LayerSizes(w_st, w_read, w_full, 2.0 * mats, comp, hidden=cfg.hidden, kv_elems=2 * kv_dim,
                       kv_bytes=2.0 * kv_row, attn_dim=cfg.n_heads * cfg.head_dim, ffn=cfg.ffn)
    x_st, _, x_full, _ = weights([v for s in specs if s.kind != "decoder" for v in s.shapes.values()])
    _, head_read, _, head_mats = weights([(cfg.vocab_size, cfg.embed_dim)])  # only lm_head is a matmul
    extra = LayerSizes(x_st, head_read, x_full, 2.0 * head_mats, comp, engine_layers=2)
    return layer, extra


# -- time -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    gpu_batch_size: int
    num_gpu_batches: int
    prompt_len: int
    gen_len: int

    @property
    def rows(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches


def _cpu_attn_rate(hw: HardwareProfile, gpu_batch: int, hidden: int) -> float:
    """FlexGen's small-batch correction of CPU attention throughput (a no-op with zero constants)."""
    c1, c2, c3 = hw.cpu_small_batch
    a = max(0.0, math.log2(64 / gpu_batch))
    b = max(0.0, math.log2(4096 / hidden))
    return max(0.1, 1 + c1 * a * b - c2 * a - c3 * b) * hw.cpu_attn_flops


def _stage(hw: HardwareProfile, ctog: Lin, gtoc: Lin, dtoc: Lin, ctod: Lin, compute: Expr, *, decode: bool,
           overlap: bool) -> Expr:
    if not overlap:
        return Sum((ctog, gtoc, dtoc, ctod, compute))
    if hw.shared_host_memory:
        # Both memory tiers are host RAM, used in place: no transfers. Disk reads land in reused
        # staging buffers on an I/O thread and hide behind compute.
        return Max((dtoc + ctod, compute))
    if decode:
        return Sum((ctog, Max((gtoc, dtoc, ctod, compute))))
    return Max((ctog + dtoc, gtoc + ctod, compute))


def _matmuls(hw: HardwareProfile, size: LayerSizes, block: Block, tokens_per_row: int, rate: float) -> Sum:
    """Every GPU batch's matmuls plus the fixed per-layer cost.

    A GPU overlaps streaming the weights from device memory with the arithmetic: the slower one
    bounds a matmul. A CPU's cores do both, so they add up, and the arithmetic runs at the
    large-GEMM rate (streaming is priced separately).
    """
    k = block.num_gpu_batches
    flops = block.gpu_batch_size * tokens_per_row * size.flops_per_token
    overhead = k * size.engine_layers * hw.layer_overhead_s
    stream = Lin(k * size.weight_read_bytes / hw.gpu_mem_bw)
    if hw.shared_host_memory:
        return Sum((Lin(k * flops / hw.mm_prefill_flops), stream, Lin(overhead)))
    return Sum((Max((Lin(k * flops / rate), stream)), Lin(overhead)))


def layer_times(hw: HardwareProfile, size: LayerSizes, block: Block, policy: Policy,
                prompt_tokens: int | None = None) -> tuple[Expr, Expr]:
    """(prefill, one decode step) time of one layer for the whole block, as expressions.

    `prompt_tokens` is how many prompt positions the layer computes in prefill (the head only needs
    the last one); it defaults to the prompt length.
    """
    b, s = block.rows, block.prompt_len
    s_in = s if prompt_tokens is None else prompt_tokens
    w_off, w_disk = frac("wc", "wd"), frac("wd")
    h_off, h_disk = frac("hc", "hd"), frac("hd")
    c_off, c_disk = frac("cc", "cd"), frac("cd")
    # flexhelm decodes compressed weights once per layer load for all GPU batches; FlexGen's runtime
    # (which the t4-paper constants describe) decodes them again for every GPU batch
    decodes = block.num_gpu_batches if hw.runtime == "flexgen" else 1
    dq_weights = decodes * size.weight_full_bytes / hw.dequant_bw if policy.compress_weight else 0.0
    if hw.shared_host_memory and not policy.compress_weight and size.weight_bytes != size.weight_full_bytes:
        dq_weights = size.weight_full_bytes / hw.gpu_mem_bw  # a CPU converts stored weights (e.g. fp16) once per load

    # prefill: every prompt position of every row passes through the layer once
    act = b * s_in * size.hidden_bytes
    cache = b * s * size.kv_bytes
    encode = b * s * size.kv_elems * size.elem_bytes / hw.dequant_bw if policy.compress_cache else 0.0
    attn = b * s * s * 4 * size.attn_dim / hw.bmm_prefill_flops  # FlexGen's 4*s^2*h FLOPs, unmasked
    prefill = _stage(
        hw,
        ctog=(size.weight_bytes * w_off + act * h_off) / hw.ctog_bw,
        gtoc=cache * c_off / hw.gtoc_cache_bw + act * h_off / hw.gtoc_act_bw,
        dtoc=(size.weight_bytes * w_disk + act * h_disk) / hw.dtoc_bw,
        ctod=cache * c_disk / hw.ctod_cache_bw + act * h_disk / hw.ctod_bw,
        compute=Sum((_matmuls(hw, size, block, s_in, hw.mm_prefill_flops), Lin(attn + dq_weights + encode))),
        decode=False, overlap=policy.overlap)

    # decode: one new token per row attends over the average context
    ctx = s + block.gen_len / 2
    act = b * size.hidden_bytes
    read, new = b * ctx * size.kv_bytes, b * size.kv_bytes
    attn_flops = b * ctx * 4 * size.attn_dim
    on_device = frac("cg") if policy.cpu_cache_compute else Lin(1.0)
    device = on_device * (attn_flops / hw.bmm_decode_flops) + dq_weights
    if policy.compress_cache:
        device = device + on_device * (b * ctx * size.kv_elems * size.elem_bytes / hw.dequant_bw)
    compute = [_matmuls(hw, size, block, 1, hw.mm_decode_flops), device]
    ctog = (size.weight_bytes * w_off + act * h_off) / hw.ctog_bw
    gtoc = act * h_off / hw.gtoc_act_bw
    if policy.cpu_cache_compute and size.kv_elems:
        host = c_off * (attn_flops / _cpu_attn_rate(hw, block.gpu_batch_size, size.hidden))
        if policy.compress_cache:
            host = host + c_off * (b * ctx * size.kv_elems * 4 / hw.cpu_dequant_bw)
        compute.append(host)
        # queries and the new keys/values travel to the host cache; attention outputs travel back
        gtoc = gtoc + c_off * (b * (size.attn_dim + size.kv_elems) * size.elem_bytes / hw.gtoc_act_bw)
        ctog = ctog + c_off * (b * size.attn_dim * size.elem_bytes / hw.ctog_bw)
    else:
        ctog = ctog + read * c_off / hw.ctog_bw
        gtoc = gtoc + new * c_off / hw.gtoc_cache_bw
    decode = _stage(
        hw,
        ctog=ctog, gtoc=gtoc,
        dtoc=(size.weight_bytes * w_disk + act * h_disk + read * c_disk) / hw.dtoc_bw,
        ctod=new * c_disk / hw.ctod_cache_bw + act * h_disk / hw.ctod_bw,
        compute=Sum(tuple(compute)), decode=True, overlap=policy.overlap)
    return prefill, decode


@dataclass(frozen=True)
class TimeModel:
    """Total prefill and decode time of one block as expressions over the placement fractions."""

    prefill: Expr
    decode: Expr

    @property
    def total(self) -> Sum:
        return Sum((self.prefill, self.decode))


def time_model(cfg: ModelConfig, hw: HardwareProfile, policy: Policy, prompt_len: int, gen_len: int) -> TimeModel:
    """Prefill = every layer once over the prompt; decode = gen_len - 1 further steps."""
    block = Block(policy.gpu_batch_size, policy.num_gpu_batches, prompt_len, gen_len)
    layer, extra = model_sizes(cfg, policy, hw.device)
    pre, dec = layer_times(hw, layer, block, policy)
    head_pre, head_dec = layer_times(hw, extra, block, policy, prompt_tokens=1)
    steps = max(0, gen_len - 1)
    prefill = Sum((Scale(cfg.n_layers, pre), head_pre))
    decode = Scale(steps, Sum((Scale(cfg.n_layers, dec), head_dec)))
    return TimeModel(prefill, decode)


# -- memory ---------------------------------------------------------------------------------------

_LAYOUTS: dict[tuple, memory.Layout] = {}


def plan_device(device: str) -> torch.device:
    """The engine's spelling of a profile's device ("cuda" or "cpu")."""
    return torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")


def layout(cfg: ModelConfig, policy: Policy, device: str) -> memory.Layout:
    """The engine's layout of the weights (engine.memory.layout), kept per model and weight settings: a search
    asks for the same few many times."""
    dev = plan_device(device)
    compute, storage = memory.dtypes(policy, dev)
    key = (cfg, device, compute, storage, policy.w_gpu_percent, policy.w_cpu_percent, policy.compress_weight,
           policy.comp_weight_bits, policy.comp_weight_group, policy.comp_weight_dim, policy.fused_int4,
           policy.direct_io, policy.num_gpu_batches == 1)
    if key not in _LAYOUTS:
        if len(_LAYOUTS) > 256:
            _LAYOUTS.clear()
        _LAYOUTS[key] = memory.layout(cfg, policy, dev, compute, storage)
    return _LAYOUTS[key]


def _corner(kind: int, tier: int) -> tuple[float, ...]:
    """Six percentages with one kind (0 weights, 1 cache, 2 activations) wholly on one tier, the rest on the gpu."""
    pct = [100.0, 0.0] * 3
    pct[2 * kind:2 * kind + 2] = [(100.0, 0.0), (0.0, 100.0), (0.0, 0.0)][tier]
    return tuple(pct)


def memory_model(cfg: ModelConfig, policy: Policy, prompt_len: int, gen_len: int,
                 device: str = "cuda") -> dict[str, list[Lin]]:
    """Bytes per tier, and of host memory ("host"), as linear expressions in the placement fractions.

    The figures are the engine's own plan (engine.memory), taken with each kind wholly on each tier. Its
    parts each follow one kind's placement (weights: the weights and their buffers; cache: the KV cache
    and the prefix fetched for attention; activations), so these corners give the coefficients: the
    linear program sees the engine's numbers at every corner and their interpolation between. The host
    has two peaks: running a block, and loading a weight (engine.memory.MemoryPlan.host_peak).
    """
    dev, rows = plan_device(device), policy.block_size
    tiers: dict[str, Lin] = {t: Lin() for t in TIERS}
    loaded = {t: Lin() for t in TIERS}
    loading = 0
    for i in range(len(TIERS)):
        lay = layout(cfg, policy.with_percent(*_corner(0, i)), device)
        for t in TIERS:
            loaded[t] = loaded[t] + frac(FRACTIONS[i]) * (lay.weights[t] + lay.buffers[t])
        loading = max(loading, lay.loading)
        for kind, row in ((1, "cache"), (2, "activations")):
            corner = policy.with_percent(*_corner(kind, i))
            part = memory.plan(cfg, corner, dev, {}, None, prompt_len=prompt_len, gen_len=gen_len, rows=rows,
                               lay=layout(cfg, policy, device)).bytes
            for t in TIERS:
                value = part[row][t] + (part["transient"][t] if kind == 1 else 0)
                tiers[t] = tiers[t] + frac(FRACTIONS[3 * kind + i]) * value
    run = {t: loaded[t] + tiers[t] for t in TIERS}
    host = ("gpu", "cpu") if dev.type == "cpu" else ("cpu",)
    return {**{t: [run[t]] for t in TIERS},
            "host": [sum((run[t] for t in host), Lin()), sum((loaded[t] for t in host), Lin()) + loading]}


def policy_fractions(policy: Policy, cfg: ModelConfig | None = None, device: str = "cuda") -> list[float]:
    """The nine placement fractions of a policy; with `cfg`, the ones the engine realises: weights are placed
    whole (engine.placement) and the cache by KV head, so their shares differ from the percentages."""
    x = [policy.split(kind)[tier] for kind in ("weight", "cache", "act") for tier in TIERS]
    if cfg is None:
        return x
    weights = layout(cfg, policy, device).weights
    total = sum(weights.values()) or 1
    heads = split_count(cfg.kv_heads, policy.split("cache"))
    x[0:3] = [weights[t] / total for t in TIERS]
    x[3:6] = [(heads[t][1] - heads[t][0]) / cfg.kv_heads if t in heads else 0.0 for t in TIERS]
    return x


def peak_memory(cfg: ModelConfig, policy: Policy, prompt_len: int, gen_len: int,
                device: str = "cuda") -> dict[str, int]:
    """The cost model's peak bytes per tier ("gpu" is host memory on a CPU-only machine), at the fractions the
    engine realises for the policy."""
    x = policy_fractions(policy, cfg, device)
    model = memory_model(cfg, policy, prompt_len, gen_len, device)
    return {tier: int(max(e.value(x) for e in model[tier])) for tier in TIERS}


# -- prediction -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prediction:
    throughput_tok_s: float  # generated tokens / (prefill + decode), FlexGen's definition
    prefill_s: float
    decode_s: float
    peak_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s


def predict(cfg: ModelConfig, hardware: HardwareProfile, policy: Policy, prompt_len: int,
            gen_len: int) -> Prediction:
    """Predicted time and throughput of one block of `policy.block_size` rows."""
    model = time_model(cfg, hardware, policy, prompt_len, gen_len)
    x = policy_fractions(policy, cfg, hardware.device)
    prefill, decode = evaluate(model.prefill, x), evaluate(model.decode, x)
    return Prediction(policy.block_size * gen_len / (prefill + decode), prefill, decode,
                      peak_memory(cfg, policy, prompt_len, gen_len, hardware.device))
