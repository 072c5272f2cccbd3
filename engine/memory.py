"""The engine's own estimate of its peak bytes per tier, checked against the budgets up front."""

from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.errors import UserError
from engine.models.base import LayerSpec
from engine.placement import split_count
from engine.policy import TIERS, Policy
from engine.quant.codec import RowCodec, WeightCodec
from engine.storage.host_memory import available_ram
from engine.storage.tiers import DiskStore, human
from engine.tables import CHUNK_ELEMS, Table

_CHECK_HINT = "raise the budget (--gpu-mem/--cpu-mem, a bigger --offload-dir) or move data with --percent"


def zero() -> dict[str, int]:
    return dict.fromkeys(TIERS, 0)


def weight_bytes(placed: list[dict[str, tuple[str, WeightCodec]]]) -> dict[str, int]:
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


def working_bytes(placed: list[dict[str, tuple[str, WeightCodec]]], specs: list[LayerSpec], device: torch.device,
                  compute: torch.dtype, at_use: list[frozenset[str]], policy: Policy) -> dict[str, int]:
    """Every slot of weights in compute form and of disk read staging (buffer_slots)."""
    slots = buffer_slots(device, policy)
    return {"gpu": slots["gpu"] * max(layer_working_bytes(layer, spec.tables, device, compute,
                                                          tables_at_use(spec, names))
                                      for layer, spec, names in zip(placed, specs, at_use, strict=True)),
            "cpu": slots["cpu"] * max(layer_staging_bytes(layer, tables_at_use(spec, names))
                                      for layer, spec, names in zip(placed, specs, at_use, strict=True)),
            "disk": 0}


def tables_at_use(spec: LayerSpec, at_use: frozenset[str]) -> frozenset[str]:
    return at_use & frozenset(spec.tables)


def table_scratch_bytes(placed: list[dict[str, tuple[str, WeightCodec]]], specs: list[LayerSpec],
                        at_use: list[frozenset[str]], device: torch.device, compute: torch.dtype) -> dict[str, int]:
    """Scratch of the vocabulary tables used a chunk at a time (engine.tables.Table): one decoded chunk on
    the device unless every table is already in compute form there, and one stored chunk in host memory
    when a table is read from disk at use."""
    decoded = any(not codec.in_place(data_device(tier, device), device, compute) or name in names
                  for layer, spec, names in zip(placed, specs, at_use, strict=True)
                  for name, (tier, codec) in layer.items() if name in spec.tables)
    from_disk = any(tables_at_use(spec, names) for spec, names in zip(specs, at_use, strict=True))
    elem = torch.empty((), dtype=compute).element_size()
    return {"gpu": CHUNK_ELEMS * elem if decoded else 0, "cpu": CHUNK_ELEMS * 4 if from_disk else 0, "disk": 0}


def block_bytes(cfg: ModelConfig, policy: Policy, batches: list[tuple[int, int]], steps: int,
                storage, compute_elem: int, cache_quant, scratch: dict[str, int]) -> dict[str, int]:
    """KV cache, activations and transient compute buffers of one block of (rows, padded_len) batches,
    plus the tables' `scratch` (table_scratch_bytes)."""
    total = zero()
    for rows, length in batches:
        for tier, (h0, h1) in split_count(cfg.kv_heads, policy.split("cache")).items():
            codec = RowCodec(rows * (h1 - h0) * cfg.head_dim, storage, cache_quant, vector=cfg.head_dim)
            total[tier] += 2 * cfg.n_layers * (length + steps) * codec.row_bytes
        for tier, (a, b) in split_count(rows * length * cfg.hidden, policy.split("act")).items():
            total[tier] += (b - a) * compute_elem
    rows, length = max(batches, key=lambda rl: rl[0] * rl[1])
    transient = rows * length * (cfg.ffn + 4 * cfg.hidden) * compute_elem
    transient += rows * cfg.n_heads * length * length * 4 + rows * cfg.vocab_size * 4 * 2
    total["gpu"] += transient + scratch["gpu"]
    total["cpu"] += scratch["cpu"]
    return total


def check(need: dict[str, int], budgets: dict[str, int], what: str, device: torch.device) -> None:
    """Refuse up front, in one line that names the numbers, a plan that exceeds any budget.

    Without a GPU the gpu and cpu tiers are both host memory, so together they must also fit in
    what the host (or the memory cgroup) has left.
    """
    over = [f"{t} needs {human(need[t])} > budget {human(budgets[t])}" for t in TIERS if need[t] > budgets[t]]
    if device.type != "cuda" and need["gpu"] + need["cpu"] > (room := available_ram()):
        over.append(f"gpu + cpu tiers (both host memory here) need {human(need['gpu'] + need['cpu'])} > "
                    f"{human(room)} available")
    if over:
        raise UserError(f"{what}: " + "; ".join(over) + f"; {_CHECK_HINT}")
