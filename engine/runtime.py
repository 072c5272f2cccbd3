"""A loaded model as the schedule sees it: stored weights, tiers, buffers and the I/O pool."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.config import ModelConfig
from engine.models.base import LayerSpec, ModelAdapter
from engine.policy import Policy
from engine.quant.codec import WeightCodec
from engine.quant.groupwise import QuantSpec
from engine.quant.int4_kernel import PackedLinear
from engine.storage.tiers import DiskStore, MemoryStore, Tier, aligned_empty
from engine.tables import Table

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
    # Why capturing a decode step as a CUDA graph failed, once it has (schedule.DecodeGraph): said once, and
    # the engine runs its decode steps eagerly from then on.
    graph_failures: list[str] = field(default_factory=list)
    # On a GPU, per staging slot, the event after the upload that last read it (schedule.uploaded).
    uploads: list[torch.cuda.Event | None] = field(init=False)
    # Per layer, the weights used where they are stored (the gpu tier, already in compute form), bound
    # once here as views of their stores, and the rest, which every use of the layer loads again. A
    # layer with nothing to load costs a decode step no views, buffers or copies.
    bound: list[dict[str, Any]] = field(init=False)
    streamed: list[dict[str, StoredWeight]] = field(init=False)

    def __post_init__(self) -> None:
        bound: list[dict[str, Any]] = [{} for _ in self.weights]
        for pos, layer in enumerate(self.weights):
            spec = self.specs[pos]
            for name, sw in layer.items():
                table = name in spec.tables
                if self.resident(sw, table):
                    data = sw.store.read(0, sw.codec.nbytes)
                    if self.input_major(pos, name):
                        bound[pos][name] = InputMajor(data.view(self.compute_dtype).view(sw.codec.shape[::-1]))
                    else:
                        bound[pos][name] = compute_form(self, sw.codec, table, data, data[:0])
        object.__setattr__(self, "uploads", [None] * max(1, len(self.staging)))
        object.__setattr__(self, "bound", bound)
        object.__setattr__(self, "streamed", [{n: sw for n, sw in layer.items() if n not in b}
                                              for layer, b in zip(self.weights, bound, strict=True)])

    def resident(self, sw: StoredWeight, table: bool) -> bool:
        """Whether a weight is used as it is stored: in memory on the compute device, in compute form.

        Only the gpu tier's: a view of the cpu tier (the same memory on a CPU) is still counted as a read
        of that tier at every use, as the transfer it is on a GPU.
        """
        return (sw.tier == "gpu" and isinstance(sw.store, MemoryStore) and sw.store.buf.device == self.device
                and sw.codec.working_room(table, self.device, self.device, self.compute_dtype) == 0)

    def input_major(self, pos: int, name: str) -> bool:
        """Whether weight `name` of layer `pos` is stored transposed, (in, out), and multiplied as InputMajor:
        on a CPU in fp32, a resident 2-D weight of a product (the head's table, an LM head, included)."""
        sw, spec = self.weights[pos][name], self.specs[pos]
        table = name in spec.tables
        return (self.device.type == "cpu" and self.compute_dtype == sw.codec.storage == torch.float32
                and sw.codec.quant is None
                and len(sw.codec.shape) == 2 and (not table or spec.kind == "head") and self.resident(sw, table))

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


class InputMajor:
    """A resident 2-D weight on a CPU, multiplied from an (in, out) layout rather than F.linear's (out, in).

    At a decode step's few rows, MKL's fp32 product against an (in, out) matrix ran up to 2x faster (the
    OPT-125m LM head at 8 rows: 8.4 against 17.5 ms; docs/measurements.md), and no slower at a prefill's
    thousands of rows. The weight is written to its store transposed as it streams in: nothing more is
    held, and the store is read by no one else (a resident weight is never loaded again, Runtime.streamed).
    Only fp32: the gain was measured there, and the results stay within HF-exactness (same products, other
    summation blocking).
    """

    def __init__(self, weight: torch.Tensor):
        self.weight = weight  # (in, out): the store's bytes, written transposed at load (Runtime.input_major)

    def linear(self, x: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if b is None:
            return x @ self.weight
        return torch.addmm(b, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


def compute_form(rt: Runtime, codec: WeightCodec, table: bool, data: torch.Tensor | Callable[[], torch.Tensor],
                 buf: torch.Tensor) -> torch.Tensor | Table | PackedLinear:
    """A weight's stored bytes (or the function that reads them) in compute form: decoded into `buf` if it
    has room, else used in place."""
    data = data() if callable(data) else data
    if table:  # kept in stored form, decoded a slice at a time where it is used
        return Table(buf[:data.numel()].copy_(data, non_blocking=True) if buf.numel() else data, codec,
                     rt.compute_dtype)
    if codec.fused:  # multiplied from its packed bytes, or decoded into buf for large products
        return PackedLinear(data, codec.shape, codec.quant, codec.working(buf, rt.compute_dtype))
    return codec.decode(data, rt.device, rt.compute_dtype,
                        out=codec.working(buf, rt.compute_dtype) if buf.numel() else None)


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
