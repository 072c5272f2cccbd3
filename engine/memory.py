"""The engine's own estimate of its peak bytes per tier: one plan, made before anything is allocated.

`Engine.plan` reports it; `Engine.load` books what it says the weights and buffers take, so the two
cannot drift apart; `Engine.generate` checks each block against it before the block runs. Beyond what
the tiers book (weights, buffers, KV cache, activations), a plan counts what a block's compute
allocates and frees as it goes (a layer's intermediates, attention masks, the cache prefix fetched
for attention, logits, the caller's results) and what loading one tensor takes, so that a plan the
engine accepts fits the memory it was given.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.channel_keys import segment_bytes
from engine.config import ModelConfig
from engine.errors import UserError
from engine.markdown import markdown_table
from engine.models.base import LayerSpec
from engine.models.registry import adapter_for
from engine.placement import place_layer_weights, split_count
from engine.policy import TIERS, Policy, torch_dtype
from engine.quant import int4_kernel
from engine.quant.codec import WeightCodec
from engine.quant.groupwise import QuantSpec
from engine.storage.host_memory import available_ram
from engine.storage.tiers import DiskStore, human
from engine.tables import CHUNK_ELEMS, Table

_CHECK_HINT = "raise the budget (--gpu-mem/--cpu-mem, a bigger --offload-dir) or move data with --percent"

# fp32 copies of one GPU batch's logits alive at once: the LM head's product, its log-softmax, and the
# sampler's working copies (scaled, filtered and sorted scores, probabilities).
LOGIT_COPIES = 4
# Host bytes per position (prompt or generated) of every row of a call: token ids, log-probs and row
# state as Python objects, which live until the call returns.
RESULT_BYTES = 256
# What the allocators hold beyond the tensors alive at a peak (freed blocks not yet reused, rounding),
# as a share of the transient bytes (docs/measurements.md, "Peak memory against the plan"). Measured with
# glibc's mmap threshold fixed (Policy.return_freed_memory, return_freed_memory below): a process that
# must stay within its plan turns that on; without it, glibc's heaps may keep up to about 1.6x more.
ALLOCATOR_SLACK = 0.25
# glibc hands freed blocks of at least this size straight back to the kernel (return_freed_memory).
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h

TIER_ROWS = ("weights", "buffers", "cache", "activations", "transient")


def zero() -> dict[str, int]:
    return dict.fromkeys(TIERS, 0)


def dtypes(policy: Policy, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(compute, storage) dtypes: fp16 on a GPU and fp32 on a CPU unless the policy says; storage follows
    compute unless the policy says."""
    default = torch.float16 if device.type == "cuda" else torch.float32
    compute = torch_dtype(policy.compute_dtype) if policy.compute_dtype else default
    return compute, torch_dtype(policy.storage_dtype) if policy.storage_dtype else compute



def cache_quant(policy: Policy) -> QuantSpec | None:
    return QuantSpec(policy.comp_cache_bits, policy.comp_cache_group) if policy.compress_cache else None


# -- weights and their buffers ---------------------------------------------------------------------------

Placed = list[dict[str, tuple[str, WeightCodec]]]


def weight_bytes(placed: Placed) -> dict[str, int]:
    """Bytes of stored weights per tier."""
    total = zero()
    for layer in placed:
        for tier, codec in layer.values():
            total[tier] += codec.nbytes
    return total


def data_device(tier: str, device: torch.device) -> torch.device:
    """Where a weight's stored bytes are when decoded: gpu-tier data on the device, the rest in host memory."""
    return device if tier == "gpu" else torch.device("cpu")


def layer_working_bytes(layer: dict[str, tuple[str, WeightCodec]], tables: tuple[str, ...],
                        device: torch.device, compute: torch.dtype, tables_at_use: frozenset[str]) -> int:
    """Working-buffer room for one layer's weights in compute form; weights used in place need none.

    Vocabulary tables stay in stored form (engine.tables): they only need room when their bytes
    must first be moved to the device, and none when they are read from disk at use.
    """
    return sum(codec.working_room(name in tables, data_device(tier, device), device, compute)
               for name, (tier, codec) in layer.items() if name not in tables_at_use)


def read_at_use(layer: dict[str, tuple[str, WeightCodec]], spec: LayerSpec, device: torch.device,
                policy: Policy) -> frozenset[str]:
    """Names of the disk weights read where they are used rather than when their layer loads.

    Embedding tables, on any device: a lookup reads only its rows (engine.tables). On a CPU with
    buffered reads, every other disk weight too: the read is a copy out of the page cache on the
    cores that compute needs anyway, so no worker can hide it, and made right before its matmul the
    bytes are still in cache when the matmul reads them. An LM head is then read a chunk at a time,
    right before each chunk's matmul, but only with one GPU batch: it is read whole per use, and more
    GPU batches would each read it. Everywhere else a worker reads ahead, overlapping compute.
    """
    on_compute_thread = device.type == "cpu" and not policy.direct_io
    chunked_head = on_compute_thread and policy.num_gpu_batches == 1
    return frozenset(name for name, (tier, codec) in layer.items()
                     if tier == "disk" and len(codec.shape) == 2
                     and (Table.reads_rows(codec) and (spec.kind == "embed" or chunked_head)
                          if name in spec.tables else on_compute_thread))


def layer_staging_bytes(layer: dict[str, tuple[str, WeightCodec]], tables_at_use: frozenset[str]) -> int:
    """Staging room for reading one layer's disk-tier weights (tables read at use bring their own)."""
    return sum(DiskStore.staging_bytes(c.nbytes) for n, (t, c) in layer.items()
               if t == "disk" and n not in tables_at_use)


def buffer_slots(device: torch.device, policy: Policy) -> dict[str, int]:
    """Slots of working (gpu tier) and staging (cpu tier) buffers a policy needs.

    Two where a worker fills the next layer's while the current layer is in use: staging for direct
    reads or any read on a GPU, working for decoding on a GPU's copy stream. One where the compute
    thread fills them itself, one layer after the other: on a CPU it decodes, and reads buffered.
    """
    cuda = device.type == "cuda"
    return {"gpu": 2 if cuda else 1, "cpu": 2 if cuda or policy.direct_io else 1}


def tables_at_use(spec: LayerSpec, at_use: frozenset[str]) -> frozenset[str]:
    return at_use & frozenset(spec.tables)


@dataclass(frozen=True)
class Layout:
    """Where each weight of each layer is stored and in what form, and the buffers loading them needs."""

    specs: list[LayerSpec]
    placed: Placed
    at_use: list[frozenset[str]]  # per layer, the disk weights read where they are used (read_at_use)
    slots: dict[str, int]  # buffer_slots
    buffers: dict[str, int]  # per tier, every slot: working buffers (gpu) and disk read staging (cpu)
    table_scratch: dict[str, int]  # per tier, the chunk of a vocabulary table in use (engine.tables)
    loading: int  # host bytes streaming in one weight takes beside what is stored (loading_bytes)
    weights: dict[str, int]  # per tier, the stored weights (weight_bytes)


def _weight_quant(quant: QuantSpec | None, spec: LayerSpec, name: str) -> QuantSpec | None:
    """A weight's quantizer. The LM head keeps min-max under any fit: its extreme weights set the logits
    of the tokens they favour, and fitted (clipped) they cost SmolLM2 most of a fit's gain (issue 19)."""
    if quant is not None and spec.kind == "head" and name in spec.tables:
        return dataclasses.replace(quant, fit="minmax")
    return quant


def layout(cfg: ModelConfig, policy: Policy, device: torch.device, compute: torch.dtype,
           storage: torch.dtype) -> Layout:
    """Place every weight (engine.placement) and size the buffers its loads need; allocates nothing."""
    specs = adapter_for(cfg).layer_specs(cfg)
    wquant = (QuantSpec(policy.comp_weight_bits, policy.comp_weight_group, policy.comp_weight_fit)
              if policy.compress_weight else None)
    placed: Placed = []
    for spec in specs:
        codecs = {n: WeightCodec(s, storage, _weight_quant(wquant, spec, n) if len(s) == 2 else None,
                                 policy.comp_weight_dim,
                                 fused=policy.fused_int4 and n not in spec.tables
                                 and int4_kernel.supported(s, wquant, policy.comp_weight_dim, device))
                  for n, s in spec.shapes.items()}
        where = place_layer_weights({n: c.nbytes for n, c in codecs.items()}, policy)
        placed.append({n: (where[n], codecs[n]) for n in codecs})
    at_use = [read_at_use(layer, spec, device, policy) for layer, spec in zip(placed, specs, strict=True)]
    slots = buffer_slots(device, policy)
    tables = [tables_at_use(spec, names) for spec, names in zip(specs, at_use, strict=True)]
    buffers = {"gpu": slots["gpu"] * max(layer_working_bytes(layer, spec.tables, device, compute, t)
                                         for layer, spec, t in zip(placed, specs, tables, strict=True)),
               "cpu": slots["cpu"] * max(layer_staging_bytes(layer, t)
                                         for layer, t in zip(placed, tables, strict=True)),
               "disk": 0}
    return Layout(specs, placed, at_use, slots, buffers, table_scratch_bytes(placed, specs, at_use, device, compute),
                  loading_bytes(specs, placed), weight_bytes(placed))


def table_scratch_bytes(placed: Placed, specs: list[LayerSpec], at_use: list[frozenset[str]], device: torch.device,
                        compute: torch.dtype) -> dict[str, int]:
    """Scratch of the vocabulary tables used a chunk at a time (engine.tables.Table): one decoded chunk on
    the device unless every table is already in compute form there, and one stored chunk in host memory
    when a table is read from disk at use."""
    decoded = any(not codec.in_place(data_device(tier, device), device, compute) or name in names
                  for layer, spec, names in zip(placed, specs, at_use, strict=True)
                  for name, (tier, codec) in layer.items() if name in spec.tables)
    from_disk = any(tables_at_use(spec, names) for spec, names in zip(specs, at_use, strict=True))
    elem = compute.itemsize
    return {"gpu": CHUNK_ELEMS * elem if decoded else 0, "cpu": CHUNK_ELEMS * 4 if from_disk else 0, "disk": 0}


def loading_bytes(specs: list[LayerSpec], placed: Placed) -> int:
    """Host bytes streaming in one weight takes beside the stores, at most: its source tensor (fp32 at most),
    the tensor assembled from its parts where it has several, and its encoded bytes; the most of any weight.

    A checkpoint's files are mapped, not read: their pages are the page cache's, which the kernel reclaims,
    so they are not counted.
    """
    return max(math.prod(c.shape) * (4 + (4 if len(spec.sources[name]) > 1 else 0)) + c.nbytes
               for spec, layer in zip(specs, placed, strict=True) for name, (_, c) in layer.items())


# -- a block's KV cache, activations and transients ---------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _layer_elems(cfg: ModelConfig) -> int:
    """Values per token a decoder layer holds at its peak while it computes one pass.

    Every matrix product's output can be alive at once (q/k/v stay referenced through attention), beside
    four hidden-sized tensors: the input, a norm's output, the scaled queries and the residual sum. A gated
    FFN adds its activation and the gated product: together as wide as the fused gate/up product, which is
    recognised as the one output wider than any input.
    """
    decoder = next(s for s in adapter_for(cfg).layer_specs(cfg) if s.kind == "decoder")
    mats = [shape for shape in decoder.shapes.values() if len(shape) == 2]
    widest_out, widest_in = max(s[0] for s in mats), max(s[1] for s in mats)
    return 4 * cfg.hidden + sum(s[0] for s in mats) + (widest_out if widest_out > widest_in else 0)


def _cache_phase(cfg: ModelConfig, policy: Policy, rows: int, keys: int, storage: torch.dtype, compute_elem: int,
                 cache_quant, device: torch.device) -> dict[str, int]:
    """The cache prefix a decode pass reads for attention, by the tier whose memory holds it.

    A segment read in place (plain, in memory on the device its attention runs on) costs nothing. A
    compressed one is decoded (fp32 on a CPU, the compute dtype on a GPU); plain values are attended in
    their storage dtype. A streamed one (disk; host memory attended on a GPU) is fetched for this
    batch and, ahead, for the next, then joined with the new position: three copies, plus the read
    buffer of a disk segment in host memory.
    """
    out, plain = zero(), cache_quant is None
    storage_elem = storage.itemsize
    for tier, (h0, h1) in split_count(cfg.kv_heads, policy.split("cache")).items():
        on_host = policy.cpu_cache_compute and tier != "gpu"
        attend = torch.device("cpu") if on_host else device
        resident = tier == "gpu" or (tier == "cpu" and attend.type == "cpu")
        elems = 2 * rows * keys * (h1 - h0) * cfg.head_dim
        value = storage_elem if plain else 4 if attend.type == "cpu" else compute_elem
        where = "cpu" if on_host and device.type == "cuda" else "gpu"
        # channel-grouped keys decode into the keys attention reads, which take the decoded prefix's place
        sizes = segment_bytes(rows, h1 - h0, cfg.head_dim, keys, storage, cache_quant, policy.comp_cache_keys)
        if resident:
            out[where] += 0 if plain else elems * value
        else:
            out[where] += 3 * elems * value
            out["cpu"] += sum(sizes.values()) if tier == "disk" else 0
    return out


def _host_attention(cfg: ModelConfig, policy: Policy, rows: int, tokens: int, compute_elem: int,
                    device: torch.device) -> int:
    """Queries, new keys/values and outputs of one pass copied to host memory for attention there, at 4 bytes
    a value: the host may hold them in fp32."""
    if not (policy.cpu_cache_compute and device.type == "cuda" and policy.split("cache")["gpu"] < 1):
        return 0
    return rows * tokens * (2 * cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim * max(compute_elem, 4)


def _batch_transient(cfg: ModelConfig, policy: Policy, rows: int, length: int, steps: int, storage: torch.dtype,
                     compute_elem: int, cache_quant, device: torch.device, echo: bool) -> dict[str, int]:
    """Per tier, the most one GPU batch's compute holds at once beyond the stores: the max over its prefill,
    its last decode pass and its LM head."""
    per_token = _layer_elems(cfg) * compute_elem
    keys = length + steps
    prefill = zero()
    prefill["gpu"] = rows * length * (per_token + length * (compute_elem + 1))  # intermediates and the mask
    if cache_quant is not None and policy.comp_cache_keys == "channel":
        prefill["gpu"] += rows * length * cfg.kv_heads * cfg.head_dim * 4  # the computed keys beside their copy
    prefill["cpu"] = _host_attention(cfg, policy, rows, length, compute_elem, device)
    decode = _cache_phase(cfg, policy, rows, keys, storage, compute_elem, cache_quant, device)
    decode["gpu"] += rows * (per_token + keys * (compute_elem + 1))
    decode["cpu"] += _host_attention(cfg, policy, rows, 1, compute_elem, device)
    positions = min(64, length) if echo else 1  # echoed prompts' log-probs are computed 64 positions at a time
    head = zero()
    head["gpu"] = rows * positions * cfg.vocab_size * (4 * LOGIT_COPIES + (compute_elem if compute_elem != 4 else 0))
    return {t: max(prefill[t], decode[t], head[t]) for t in TIERS}


def block_parts(cfg: ModelConfig, policy: Policy, batches: list[tuple[int, int]], steps: int, storage: torch.dtype,
                compute_elem: int, cache_quant, scratch: dict[str, int], device: torch.device,
                rows_total: int | None = None, echo: bool = False) -> dict[str, dict[str, int]]:
    """KV cache, activations and transients per tier of one block of (rows, padded_len) GPU batches.

    `rows_total` is how many rows the whole call holds results for (default: the block's); `scratch` the
    tables' chunks (table_scratch_bytes). Transients are the largest of any one batch, since batches
    compute one at a time, plus the results, the scratch and the allocator's slack over all of them.
    """
    cache, act, transient = zero(), zero(), zero()
    for rows, length in batches:
        for tier, (h0, h1) in split_count(cfg.kv_heads, policy.split("cache")).items():
            sizes = segment_bytes(rows, h1 - h0, cfg.head_dim, length + steps, storage, cache_quant,
                                  policy.comp_cache_keys)
            cache[tier] += cfg.n_layers * sum(sizes.values())
        for tier, (a, b) in split_count(rows * length * cfg.hidden, policy.split("act")).items():
            act[tier] += (b - a) * compute_elem
        one = _batch_transient(cfg, policy, rows, length, steps, storage, compute_elem, cache_quant, device, echo)
        transient = {t: max(transient[t], one[t]) for t in TIERS}
    rows_total = rows_total if rows_total is not None else sum(r for r, _ in batches)
    longest = max(length for _, length in batches)
    transient["cpu"] += rows_total * (longest + steps) * RESULT_BYTES
    for tier in ("gpu", "cpu"):
        transient[tier] = int((transient[tier] + scratch[tier]) * (1 + ALLOCATOR_SLACK))
    return {"cache": cache, "activations": act, "transient": transient}


def block_bytes(cfg: ModelConfig, policy: Policy, batches: list[tuple[int, int]], steps: int, storage: torch.dtype,
                compute_elem: int, cache_quant, scratch: dict[str, int], device: torch.device,
                rows_total: int | None = None, echo: bool = False) -> dict[str, int]:
    """Everything one block takes per tier beyond the loaded model (block_parts, summed)."""
    parts = block_parts(cfg, policy, batches, steps, storage, compute_elem, cache_quant, scratch, device,
                        rows_total, echo)
    return {t: sum(part[t] for part in parts.values()) for t in TIERS}


# -- budgets -----------------------------------------------------------------------------------------------

def free_disk(offload_dir: str | os.PathLike | None) -> int:
    """The disk tier's default budget: free space where its folder would be made (the nearest existing
    folder on the way there), found without making anything."""
    folder = Path(offload_dir) if offload_dir else Path(tempfile.gettempdir())
    try:
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        return shutil.disk_usage(existing).free
    except (OSError, StopIteration):
        raise UserError(f"cannot reach offload folder {folder}; pass a readable --offload-dir") from None


def over_budget(need: dict[str, int], budgets: dict[str, int], device: torch.device,
                host_room: int | None = None, host_need: int | None = None) -> list[str]:
    """What exceeds its budget, one phrase each. Without a GPU the gpu and cpu tiers are both host memory,
    so `host_need` (by default the two together) must also fit in `host_room`, by default what the host
    (or its memory cgroup) has left."""
    over = [f"{t} needs {human(need[t])} > budget {human(budgets[t])}" for t in TIERS if need[t] > budgets[t]]
    if device.type != "cuda":
        room = available_ram() if host_room is None else host_room
        host = need["gpu"] + need["cpu"] if host_need is None else host_need
        if host > room:
            over.append(f"gpu + cpu tiers (both host memory here) need {human(host)} > {human(room)} available")
    return over


def check(need: dict[str, int], budgets: dict[str, int], what: str, device: torch.device,
          host_need: int | None = None) -> None:
    """Refuse up front, in one line that names the numbers, a plan that exceeds any budget."""
    over = over_budget(need, budgets, device, host_need=host_need)
    if over:
        raise UserError(f"{what}: " + "; ".join(over) + f"; {_CHECK_HINT}")


@dataclass(frozen=True)
class MemoryPlan:
    """Peak bytes per tier of a model under a policy, for one block of the given shape, against the budgets.

    A tier's peak is its weights and buffers, which `Engine.load` books exactly, plus a block's KV cache
    and activations, which a run books, and its transients, the plan's own bound. Loading a weight takes
    host memory outside the tiers for a moment (`loading`): it counts in the host's peak, not a tier's.
    """

    model: str
    device: str
    policy: str  # Policy.label()
    prompt_len: int
    gen_len: int
    rows: int  # prompts the plan is for; blocks hold up to the policy's block size
    bytes: dict[str, dict[str, int]]  # TIER_ROWS -> tier -> bytes
    loading: int
    budgets: dict[str, int]
    host_room: int | None  # without a GPU: the host memory the gpu and cpu tiers share

    @property
    def peak(self) -> dict[str, int]:
        return {t: sum(self.bytes[r][t] for r in TIER_ROWS) for t in TIERS}

    @property
    def host_peak(self) -> int:
        """The most host memory the engine holds: the cpu tier's peak, and the gpu tier's where the host is the
        device, or while loading, what is loaded there and the weight being loaded."""
        tiers = ("gpu", "cpu") if self.device == "cpu" else ("cpu",)
        loaded = sum(self.bytes["weights"][t] + self.bytes["buffers"][t] for t in tiers)
        return max(sum(self.peak[t] for t in tiers), loaded + self.loading)

    @property
    def shortfall(self) -> str | None:
        """None when the plan fits, else the one line that says what does not."""
        over = over_budget(self.peak, self.budgets, torch.device(self.device), self.host_room, self.host_peak)
        return f"{self.model} does not fit: " + "; ".join(over) + f"; {_CHECK_HINT}" if over else None

    @property
    def fits(self) -> bool:
        return self.shortfall is None

    def to_dict(self) -> dict:
        return {"model": self.model, "device": self.device, "policy": self.policy, "prompt_len": self.prompt_len,
                "gen_len": self.gen_len, "rows": self.rows, "bytes": self.bytes, "peak": self.peak,
                "loading": self.loading, "host_peak": self.host_peak, "budgets": self.budgets,
                "host_room": self.host_room, "fits": self.fits}

    def table(self) -> str:
        """The per-tier rows as a Markdown table, in GiB, and the host's peak."""
        body = [[row, *(self.bytes[row][t] / 2**30 for t in TIERS)] for row in TIER_ROWS]
        body += [["peak", *(self.peak[t] / 2**30 for t in TIERS)],
                 ["budget", *(self.budgets[t] / 2**30 for t in TIERS)]]
        title = (f"{self.model} on {self.device}, {self.policy}, prompt {self.prompt_len} + {self.gen_len} new, "
                 f"{self.rows} rows")
        room = "" if self.host_room is None else f" of {human(self.host_room)} available"
        host = (f"host memory at the peak: {human(self.host_peak)}{room} (loading a weight takes "
                f"{human(self.loading)} beside what is loaded)")
        return title + "\n\n" + markdown_table(["GiB", *TIERS], body, floatfmt=".3f") + "\n\n" + host


def plan(cfg: ModelConfig, policy: Policy, device: torch.device, budgets: dict[str, int], host_room: int | None, *,
         prompt_len: int, gen_len: int, rows: int, echo: bool = False, lay: Layout | None = None) -> MemoryPlan:
    """The plan of `rows` prompts of `prompt_len` tokens and `gen_len` new ones, their first block being the
    largest; `lay` is the policy's layout when the caller has it already."""
    compute, storage = dtypes(policy, device)
    lay = lay or layout(cfg, policy, device, compute, storage)
    first, gbs = min(rows, policy.block_size), policy.gpu_batch_size
    batches = [(min(gbs, first - i), prompt_len) for i in range(0, first, gbs)]
    parts = block_parts(cfg, policy, batches, max(1, gen_len), storage, compute.itemsize, cache_quant(policy),
                        lay.table_scratch, device, rows, echo)
    return MemoryPlan(cfg.name or "model", str(device), policy.label(), prompt_len, gen_len, rows,
                      {"weights": lay.weights, "buffers": lay.buffers, **parts}, lay.loading, budgets, host_room)


# -- the allocator -------------------------------------------------------------------------------------------

@functools.cache
def return_freed_memory() -> bool:
    """Have glibc give every freed block of MMAP_THRESHOLD bytes or more back to the kernel at once.

    By default glibc raises that threshold, up to 32 MiB, each time a large block is freed. From then on
    the tensors a block's compute makes and frees (MBs each, growing with the context) come from heaps
    that keep freed pages resident, and a run reached twice the peak its tensors needed
    (docs/measurements.md, "Peak memory against the plan"). Set once per process; False where the C
    library is not glibc. Opt-in (`Policy.return_freed_memory`): the setting is the whole process's, and
    it slows other libraries in it (HF `generate` by about 20%) and the engine itself (about 8%).
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    return bool(mallopt and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
