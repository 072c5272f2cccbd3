"""The zig-zag block schedule: one generic loop for every placement policy and model family.

For each token step, for each layer, for each GPU batch: prefetch the next layer's weights and
the next batch's activations and KV cache, compute, and store, with I/O on worker threads. A
layer's weights are loaded once per block and reused by all of its GPU batches.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from engine.config import ModelConfig
from engine.models.base import LayerSpec
from engine.models.layers import attention, linear
from engine.placement import split_count
from engine.policy import Policy
from engine.quant.codec import RowCodec, WeightCodec
from engine.quant.int4_kernel import PackedLinear
from engine.storage.tiers import DiskStore, MemoryStore, Tier, aligned_empty
from engine.tables import Table

Store = MemoryStore | DiskStore


@dataclass
class StoredWeight:
    tier: str
    store: Store
    codec: WeightCodec


@dataclass
class Runtime:
    """A loaded model: everything the schedule needs, nothing about the caller."""

    cfg: ModelConfig
    adapter: object
    specs: list[LayerSpec]
    weights: list[dict[str, StoredWeight]]
    tiers: dict[str, Tier]
    policy: Policy
    device: torch.device
    compute_dtype: torch.dtype
    storage_dtype: torch.dtype
    io: ThreadPoolExecutor | None
    cache_quant: object | None = None
    copy_stream: object | None = None  # a CUDA stream for weight uploads, so they overlap compute
    # Slots of reusable buffers, alternating between consecutive layer loads: where a worker fills the
    # next layer's while the current one is in use, two (memory.buffer_slots); else one. Fresh
    # allocations would cost more in page faults than the copies themselves.
    working: list[torch.Tensor] = field(default_factory=list)  # weights in compute form, on the device
    staging: list[torch.Tensor] = field(default_factory=list)  # aligned host buffers for disk reads
    loads: int = 0  # layer loads so far: they alternate between the slots
    background: list[bool] = field(default_factory=list)  # per layer: whether its load has work for a worker
    read_at_use: list[frozenset[str]] = field(default_factory=list)  # per layer: see memory.read_at_use

    def reserve_buffers(self, nbytes: dict[str, int], slots: dict[str, int]) -> None:
        """Allocate (and account on their tiers) the slots of working (gpu) and staging (cpu) buffers."""
        pin = self.device.type == "cuda"
        for tier, buffers in (("gpu", self.working), ("cpu", self.staging)):
            self.tiers[tier].alloc(nbytes[tier])
            for _ in range(slots[tier]):
                if tier == "gpu" and self.device.type == "cuda":
                    buffers.append(torch.empty(nbytes[tier] // slots[tier], dtype=torch.uint8, device=self.device))
                else:
                    buffers.append(aligned_empty(nbytes[tier] // slots[tier], pin=pin and tier == "cpu"))

    def table_at_use(self, pos: int, name: str) -> bool:
        """Whether weight `name` of layer `pos` is a table read from disk where used, by row or chunk."""
        return name in self.specs[pos].tables and name in self.read_at_use[pos]

    def submit(self, fn: Callable, *args, background: bool = True) -> Future:
        """Run on an I/O worker when overlapping, else now; either way the caller gets a future.

        Work that moves no data (`background=False`) runs now even when overlapping: handing it to a
        worker gains nothing, and the worker's Python would contend with compute for the GIL.
        """
        if background and self.io is not None and self.policy.overlap:
            return self.io.submit(fn, *args)
        fut: Future = Future()
        fut.set_result(fn(*args))
        return fut


@dataclass
class Rows:
    """One GPU batch: left-padded prompts and the caller's row indices."""

    index: list[int]
    ids: torch.Tensor  # (b, L) long
    mask: torch.Tensor  # (b, L) bool, False on left pads
    valid: torch.Tensor = field(init=False)  # (b, L + steps) key validity, grows with the steps

    def __post_init__(self) -> None:
        self.valid = self.mask.clone()


# -- weights -----------------------------------------------------------------------------------------

class DeferredLinear:
    """A matmul weight read from disk and decoded at its first use rather than when its layer loads.

    On a CPU a buffered read is a copy out of the page cache on the cores that compute needs anyway.
    Made right before the matmul, the copied bytes are still in cache when the matmul reads them;
    made at the layer's load, most are evicted by the rest of the layer first. Later GPU batches of
    the block reuse the weight.
    """

    def __init__(self, load: Callable[[], torch.Tensor | PackedLinear]):
        self._load, self._weight = load, None

    def linear(self, x: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if self._weight is None:
            self._weight = self._load()
        return linear(x, self._weight, b)


def read_layer(rt: Runtime, pos: int, slot: int) -> dict[str, torch.Tensor | DiskStore | Callable]:
    """Stored bytes of layer `pos`: disk weights read into the slot's staging buffer, the rest viewed in place.

    A disk weight read at its use (`Runtime.read_at_use`) comes back unread: a table as its store,
    which it reads by row or chunk, any other weight as a function that reads it into its staging room.
    """
    staging, staged, out = rt.staging[slot % len(rt.staging)], 0, {}
    for name, sw in rt.weights[pos].items():
        if not isinstance(sw.store, DiskStore):
            out[name] = sw.store.read(0, sw.codec.nbytes)
        elif rt.table_at_use(pos, name):
            out[name] = sw.store
        else:
            read = functools.partial(sw.store.read, 0, sw.codec.nbytes, out=staging[staged:])
            out[name] = read if name in rt.read_at_use[pos] else read()
            staged += DiskStore.staging_bytes(sw.codec.nbytes)
    return out


def decode_layer(rt: Runtime, pos: int, slot: int, stored: dict[str, torch.Tensor | DiskStore | Callable],
                 ready: torch.cuda.Event | None = None) -> dict[str, torch.Tensor | Table | PackedLinear]:
    """Layer `pos` in compute form: in place where possible, else decoded into the slot's working buffer.

    `ready` (CUDA) marks when the compute stream is done with the layer that last used this slot.
    """
    working, tables, out, used = rt.working[slot % len(rt.working)], rt.specs[pos].tables, {}, 0
    with torch.cuda.stream(rt.copy_stream) if rt.copy_stream is not None else contextlib.nullcontext():
        if ready is not None:
            rt.copy_stream.wait_event(ready)
        for name, data in stored.items():
            codec, table = rt.weights[pos][name].codec, name in tables
            if isinstance(data, DiskStore):
                out[name] = Table(data, codec, rt.compute_dtype, rt.device)
                continue
            on = torch.device("cpu") if callable(data) else data.device
            room = codec.working_room(table, on, rt.device, rt.compute_dtype)
            buf, used = working[used:used + room], used + room
            if callable(data):
                out[name] = DeferredLinear(functools.partial(_compute_form, rt, codec, table, data, buf))
            else:
                out[name] = _compute_form(rt, codec, table, data, buf)
    if rt.copy_stream is not None:
        rt.copy_stream.synchronize()
    return out


def _compute_form(rt: Runtime, codec: WeightCodec, table: bool, data: torch.Tensor | Callable,
                  buf: torch.Tensor) -> torch.Tensor | Table | PackedLinear:
    """A weight's stored bytes (or the function that reads them) in compute form, decoded into `buf` if it has room."""
    data = data() if callable(data) else data
    if table:  # kept in stored form, decoded a slice at a time where it is used
        return Table(buf[:data.numel()].copy_(data, non_blocking=True) if buf.numel() else data, codec,
                     rt.compute_dtype)
    if codec.fused:  # multiplied from its packed bytes, or decoded into buf for large products
        return PackedLinear(data, codec.shape, codec.quant, codec.working(buf, rt.compute_dtype))
    return codec.decode(data, rt.device, rt.compute_dtype,
                        out=codec.working(buf, rt.compute_dtype) if buf.numel() else None)


class LayerLoad:
    """One layer on its way to the compute device, in the next buffer slots.

    What a worker does, it does while the previous layer computes; the rest happens on the compute
    thread when the layer is needed. On a GPU a worker reads, uploads and decodes (on the copy stream).
    On a CPU, decoding stays on the compute thread: on a worker it fought compute for the same cores
    (4-bit OPT-1.3B at B=8 decoded 3.7x slower there). A buffered disk read on a CPU is a copy out of
    the page cache that needs the same cores and memory bandwidth as compute, and measured no faster
    on a worker; so the kernel is asked to fetch the bytes into its cache ahead (WILLNEED), and the
    copy runs when the layer is needed. Direct reads (DMA, no core needed) always go to a worker.
    """

    def __init__(self, rt: Runtime, pos: int, ready: torch.cuda.Event | None):
        rt.loads += 1
        self.rt, self.pos, self.slot, self.ready = rt, pos, rt.loads % 2, ready
        self.decoded = rt.copy_stream is not None
        self.future: Future | None = None
        if rt.policy.overlap and rt.background[pos] and rt.io is not None:
            self.future = rt.io.submit(self._load)
        elif rt.policy.overlap:
            for name, sw in rt.weights[pos].items():
                if isinstance(sw.store, DiskStore) and not rt.table_at_use(pos, name):
                    sw.store.prefetch(0, sw.codec.nbytes)

    def _load(self) -> dict:
        stored = read_layer(self.rt, self.pos, self.slot)
        return decode_layer(self.rt, self.pos, self.slot, stored, self.ready) if self.decoded else stored

    def result(self) -> dict[str, torch.Tensor | Table | PackedLinear]:
        done = self.future.result() if self.future is not None else self._load()
        return done if self.decoded else decode_layer(self.rt, self.pos, self.slot, done)

    def wait(self) -> None:
        if self.future is not None:
            self.future.result()


# -- KV cache ------------------------------------------------------------------------------------------

@dataclass
class _Segment:
    tier: str
    heads: tuple[int, int]
    codec: RowCodec
    k: Store
    v: Store
    device: torch.device  # where attention over this segment runs
    dtype: torch.dtype  # its precision: fp32 on a CPU, where half precision is ~300x slower

    def direct(self, rt: Runtime) -> bool:
        """Plain in-memory rows on the attention device can be read as views, without a copy."""
        return self.codec.quant is None and isinstance(self.k, MemoryStore) and self.k.buf.device == self.device


class LayerCache:
    """K and V of one decoder layer for one GPU batch, split over the tiers by KV head."""

    def __init__(self, rt: Runtime, batch: int, max_len: int):
        cfg, d = rt.cfg, rt.cfg.head_dim
        self.rt, self.length, self.pending = rt, 0, []
        self.segments = []
        for tier, (h0, h1) in split_count(cfg.kv_heads, rt.policy.split("cache")).items():
            codec = RowCodec(batch * (h1 - h0) * d, rt.storage_dtype, rt.cache_quant, vector=d)
            size = max_len * codec.row_bytes
            device = torch.device("cpu") if (rt.policy.cpu_cache_compute and tier != "gpu") else rt.device
            dtype = torch.float32 if device.type == "cpu" else rt.compute_dtype
            self.segments.append(_Segment(tier, (h0, h1), codec, rt.tiers[tier].store(size, "k"),
                                          rt.tiers[tier].store(size, "v"), device, dtype))

    def fetch(self) -> list:
        """Read the cached rows of the segments that cannot be viewed in place (runs on a worker)."""
        for fut in self.pending:
            fut.result()
        self.pending = []
        out = []
        for seg in self.segments:
            if seg.direct(self.rt) or self.length == 0:
                out.append(None)
                continue
            n = self.length * seg.codec.row_bytes
            out.append(tuple(seg.codec.decode(s.read(0, n), seg.device, seg.dtype) for s in (seg.k, seg.v)))
        return out

    def attend(self, fetched: list, allowed: torch.Tensor, q, k, v, scale: float) -> torch.Tensor:
        rt, group = self.rt, q.shape[2] // k.shape[2]
        b, s = q.shape[:2]
        t0, outs = self.length, []
        for seg, old in zip(self.segments, fetched, strict=True):
            h0, h1 = seg.heads
            new = [x[:, :, h0:h1].permute(1, 0, 2, 3).reshape(s, -1) for x in (k, v)]  # token-major rows
            offset, nbytes = t0 * seg.codec.row_bytes, s * seg.codec.row_bytes
            if seg.direct(rt):
                for store, rows in zip((seg.k, seg.v), new, strict=True):
                    store.write(offset, seg.codec.encode(rows))
                full = [seg.codec.decode(st.read(0, offset + nbytes), seg.device, seg.dtype)
                        for st in (seg.k, seg.v)]
            else:
                encoded = [seg.codec.encode(rows) for rows in new]
                self.pending.append(rt.submit(_write_rows, (seg.k, seg.v), offset, encoded))
                # attention sees exactly what the cache holds: compressed rows round-trip the codec
                new_dev = [seg.codec.decode(e, seg.device, seg.dtype) if seg.codec.quant is not None
                           else rows.to(seg.device, seg.dtype) for e, rows in zip(encoded, new, strict=True)]
                full = new_dev if old is None else [torch.cat(p) for p in zip(old, new_dev, strict=True)]
            kk, vv = (x.view(t0 + s, b, h1 - h0, -1).permute(1, 0, 2, 3) for x in full)
            qq = q[:, :, h0 * group:h1 * group].to(seg.device, seg.dtype)
            outs.append(attention(qq, kk, vv, allowed.to(seg.device), scale).to(rt.device, q.dtype))
        self.length = t0 + s
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def close(self) -> None:
        for fut in self.pending:
            fut.result()
        for seg in self.segments:
            seg.k.close()
            seg.v.close()


def _write_rows(stores, offset: int, encoded) -> None:
    for store, data in zip(stores, encoded, strict=True):
        store.write(offset, data)


# -- activations -----------------------------------------------------------------------------------------

class Activation:
    """One GPU batch's hidden states between layers, split over the tiers by element."""

    def __init__(self, rt: Runtime, max_elems: int):
        self.rt, self.split = rt, rt.policy.split("act")
        self.disk: DiskStore | None = None
        if self.split["disk"] > 0:
            itemsize = torch.empty((), dtype=rt.compute_dtype).element_size()
            self.disk = rt.tiers["disk"].store(max_elems * itemsize, "act")
        self.pieces: list = []
        self.shape: torch.Size | None = None
        self.held = {"gpu": 0, "cpu": 0}

    def put(self, x: torch.Tensor) -> None:
        self.shape, flat = x.shape, x.reshape(-1)
        self.pieces = []
        for tier, (a, b) in split_count(flat.numel(), self.split).items():
            piece = flat[a:b]
            if tier == "disk":
                self.pieces.append(("disk", self.rt.submit(self.disk.write, 0, piece.view(torch.uint8)), b - a))
                continue
            nbytes = piece.numel() * piece.element_size()
            self.rt.tiers[tier].alloc(nbytes)
            self.held[tier] += nbytes
            self.pieces.append((tier, piece.to(self.rt.tiers[tier].device), b - a))

    def get(self) -> torch.Tensor:
        parts = []
        for tier, item, n in self.pieces:
            if tier == "disk":
                item.result()
                itemsize = torch.empty((), dtype=self.rt.compute_dtype).element_size()
                parts.append(self.disk.read(0, n * itemsize).view(self.rt.compute_dtype).to(self.rt.device))
            else:
                if tier == "cpu":
                    self.rt.tiers["cpu"].count(read=n * item.element_size())
                parts.append(item.to(self.rt.device, non_blocking=True))
        for tier in ("gpu", "cpu"):
            self.rt.tiers[tier].release(self.held[tier])
            self.held[tier] = 0
        flat = parts[0] if len(parts) == 1 else torch.cat(parts)
        return flat.view(self.shape)

    def close(self) -> None:
        for tier in ("gpu", "cpu"):
            self.rt.tiers[tier].release(self.held[tier])
            self.held[tier] = 0
        if self.disk is not None:
            self.disk.close()


# -- the block ---------------------------------------------------------------------------------------------

# on_step(batch_no, step, last_logprobs (b, V) fp32, prompt_logprobs (b, L-1) or None)
#   -> next token ids (b,) and whether every row of the batch has finished
OnStep = Callable[[int, int, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, bool]]


@dataclass
class _StepCtx:
    positions: torch.Tensor
    allowed: torch.Tensor


def _step_ctx(rows: Rows, step: int, device: torch.device) -> _StepCtx:
    mask = rows.mask.to(device)
    if step == 0:
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        q_slots = torch.arange(mask.shape[1], device=device)
    else:
        positions = (mask.long().sum(-1, keepdim=True) + step - 1)
        q_slots = torch.tensor([mask.shape[1] + step - 1], device=device)
    valid = rows.valid.to(device)
    keys = torch.arange(valid.shape[1], device=device)
    allowed = valid[:, None, :] & (keys[None, None, :] <= q_slots[None, :, None])
    return _StepCtx(positions, allowed)


def run_block(rt: Runtime, batches: list[Rows], steps: int, echo: bool, on_step: OnStep,
              on_pass: Callable[[int, float], None]) -> None:
    """Run `steps` forward passes (1 prefill + steps-1 decodes) over every GPU batch of one block.

    `on_pass(step, seconds)` follows each pass: its time, with the device synchronized.
    """
    cfg, adapter, n_layers = rt.cfg, rt.adapter, len(rt.specs)
    caches = [[LayerCache(rt, len(r.index), r.ids.shape[1] + steps) for r in batches] for _ in range(cfg.n_layers)]
    acts = [Activation(rt, len(r.index) * r.ids.shape[1] * cfg.hidden) for r in batches]
    inputs = [r.ids.to(rt.device) for r in batches]
    finished = [False] * len(batches)
    next_layer = LayerLoad(rt, 0, _compute_done(rt))
    try:
        for step in range(steps):
            start = time.perf_counter()
            if step > 0:
                for r in batches:
                    r.valid = torch.cat([r.valid, torch.ones(len(r.index), 1, dtype=torch.bool)], dim=1)
            ctxs = [_step_ctx(r, step, rt.device) for r in batches]
            for pos, spec in enumerate(rt.specs):
                w = next_layer.result()
                next_layer = None
                if not (step == steps - 1 and pos == n_layers - 1):
                    nxt = (pos + 1) % n_layers
                    next_layer = LayerLoad(rt, nxt, _compute_done(rt))
                fetch = _fetch(rt, caches[spec.index][0]) if spec.kind == "decoder" else None
                for k, rows in enumerate(batches):
                    if spec.kind == "embed":
                        acts[k].put(adapter.embed(cfg, w, inputs[k], ctxs[k].positions))
                        continue
                    x = acts[k].get()
                    if spec.kind == "decoder":
                        cache = caches[spec.index][k]
                        fetched = fetch.result()
                        if k + 1 < len(batches):
                            fetch = _fetch(rt, caches[spec.index][k + 1])
                        attend = functools.partial(cache.attend, fetched, ctxs[k].allowed)
                        acts[k].put(adapter.decoder(cfg, w, x, ctxs[k].positions, attend))
                    else:
                        last_lp, prompt_lp = _head(rt, w, x, rows, echo and step == 0)
                        nxt, finished[k] = on_step(k, step, last_lp, prompt_lp)
                        inputs[k] = nxt.to(rt.device).view(-1, 1)
                del w
            if rt.device.type == "cuda":
                torch.cuda.synchronize(rt.device)
            on_pass(step, time.perf_counter() - start)
            if all(finished):
                break
    finally:
        if next_layer is not None:
            with contextlib.suppress(Exception):  # the error that stopped the block is the one to report
                next_layer.wait()
        for layer in caches:
            for cache in layer:
                cache.close()
        for act in acts:
            act.close()


def _fetch(rt: Runtime, cache: LayerCache) -> Future:
    return rt.submit(cache.fetch, background=not all(seg.direct(rt) for seg in cache.segments))


def _compute_done(rt: Runtime) -> torch.cuda.Event | None:
    """On a GPU, an event after the compute enqueued so far: a load may reuse that compute's slot after it."""
    if rt.copy_stream is None:
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def _head(rt: Runtime, w: dict, x: torch.Tensor, rows: Rows, echo: bool):
    """Log-probs of the next token, and with `echo` of every prompt token after the first."""
    lm = w["lm_head"]
    h = rt.adapter.final(rt.cfg, w, x if echo else x[:, -1:])
    last = torch.log_softmax(lm.linear(h[:, -1]).float(), dim=-1)
    if not echo:
        return last, None
    targets, chunk, parts = rows.ids.to(rt.device), 64, []
    for i in range(0, h.shape[1] - 1, chunk):
        lp = torch.log_softmax(lm.linear(h[:, i:i + chunk]).float(), dim=-1)
        tgt = targets[:, i + 1:i + 1 + lp.shape[1]]
        parts.append(lp[:, :tgt.shape[1]].gather(-1, tgt[..., None])[..., 0])
    prompt_lp = torch.cat(parts, dim=1) if parts else torch.empty(h.shape[0], 0, device=rt.device)
    return last, prompt_lp
