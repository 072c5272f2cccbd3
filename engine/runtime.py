"""A loaded model as the schedule sees it: stored weights, tiers, buffers and the I/O pool."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from engine.config import ModelConfig
from engine.models.base import LayerSpec, ModelAdapter
from engine.policy import Policy
from engine.quant.codec import WeightCodec
from engine.quant.groupwise import QuantSpec
from engine.storage.tiers import DiskStore, MemoryStore, Tier, aligned_empty

Store = MemoryStore | DiskStore


@dataclass
class StoredWeight:
    tier: str
    store: Store
    codec: WeightCodec


@dataclass(frozen=True)
class LayerPlan:
    """How one layer's weights are loaded, decided once at load time (engine.memory)."""

    read_at_use: frozenset[str]  # disk weights read where used rather than at the layer's load
    background: bool  # whether loading it has work for an I/O worker (reads, uploads, decoding)


@dataclass(frozen=True)
class Runtime:
    """A loaded model: everything the schedule needs, nothing about the caller. Fixed after loading."""

    cfg: ModelConfig
    adapter: ModelAdapter
    specs: list[LayerSpec]
    weights: list[dict[str, StoredWeight]]
    plans: list[LayerPlan]
    tiers: dict[str, Tier]
    policy: Policy
    device: torch.device
    compute_dtype: torch.dtype
    storage_dtype: torch.dtype
    io: ThreadPoolExecutor
    cache_quant: QuantSpec | None
    copy_stream: torch.cuda.Stream | None  # on a GPU, weight uploads run here so they overlap compute
    # Slots of reusable buffers, alternating between consecutive layer loads: where a worker fills the
    # next layer's while the current one is in use, two (memory.buffer_slots); else one. Fresh
    # allocations would cost more in page faults than the copies themselves.
    working: list[torch.Tensor]  # weights in compute form, on the device
    staging: list[torch.Tensor]  # aligned host buffers for disk reads
    table_scratch: dict[str, int]  # per tier: chunks of vocabulary tables in use (memory.table_scratch_bytes)
    loads: Iterator[int] = field(default_factory=itertools.count)  # numbers layer loads, which alternate slots

    def table_at_use(self, pos: int, name: str) -> bool:
        """Whether weight `name` of layer `pos` is a table read from disk where used, by row or chunk."""
        return name in self.specs[pos].tables and name in self.plans[pos].read_at_use

    def submit(self, fn: Callable, *args, background: bool = True) -> Future:
        """Run on an I/O worker when overlapping, else now; either way the caller gets a future.

        Work that moves no data (`background=False`) runs now even when overlapping: handing it to a
        worker gains nothing, and the worker's Python would contend with compute for the GIL.
        """
        if background and self.policy.overlap:
            return self.io.submit(fn, *args)
        fut: Future = Future()
        fut.set_result(fn(*args))
        return fut




def allocate_buffers(tiers: dict[str, Tier], device: torch.device, nbytes: dict[str, int],
                     slots: dict[str, int]) -> dict[str, list[torch.Tensor]]:
    """The slots of working (gpu tier) and staging (cpu tier) buffers, accounted on their tiers."""
    cuda = device.type == "cuda"
    out: dict[str, list[torch.Tensor]] = {}
    for tier in ("gpu", "cpu"):
        tiers[tier].alloc(nbytes[tier])
        size = nbytes[tier] // slots[tier]
        out[tier] = [torch.empty(size, dtype=torch.uint8, device=device) if cuda and tier == "gpu"
                     else aligned_empty(size, pin=cuda and tier == "cpu") for _ in range(slots[tier])]
    return out
