"""The zig-zag block schedule: one generic loop for every placement policy and model family.

For each token step, for each layer, for each GPU batch: prefetch the next layer's weights and
the next batch's activations and KV cache, compute, and store, with I/O on worker threads. A
layer's weights are loaded once per block and reused by all of its GPU batches.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from engine.kv_cache import Activation, LayerCache
from engine.models.layers import linear
from engine.quant.int4_kernel import PackedLinear
from engine.runtime import Runtime, compute_form
from engine.storage.tiers import DiskStore
from engine.tables import Table


@dataclass
class Rows:
    """One GPU batch: left-padded prompts and the caller's row indices."""

    index: list[int]
    ids: torch.Tensor  # (b, L) long
    mask: torch.Tensor  # (b, L) bool, False on left pads


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
    """Stored bytes of the weights of layer `pos` that are loaded at each use (`Runtime.streamed`): disk
    weights read into the slot's staging buffer, the rest viewed in place.

    A disk weight read at its use (`Runtime.read_at_use`) comes back unread: a table as its store,
    which it reads by row or chunk, any other weight as a function that reads it into its staging room.
    """
    staging, staged, out = rt.staging[slot % len(rt.staging)], 0, {}
    for name, sw in rt.streamed[pos].items():
        if not isinstance(sw.store, DiskStore):
            out[name] = sw.store.read(0, sw.codec.nbytes)
        elif rt.table_at_use(pos, name):
            out[name] = sw.store
        else:
            read = functools.partial(sw.store.read, 0, sw.codec.nbytes, out=staging[staged:])
            out[name] = read if name in rt.plans[pos].read_at_use else read()
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
                out[name] = DeferredLinear(functools.partial(compute_form, rt, codec, table, data, buf))
            else:
                out[name] = compute_form(rt, codec, table, data, buf)
    if rt.copy_stream is not None:
        rt.copy_stream.synchronize()
    return out


class LayerLoad:
    """One layer on its way to the compute device, in the next buffer slots.

    What a worker does, it does while the previous layer computes; the rest happens on the compute
    thread when the layer is needed. On a GPU a worker reads, uploads and decodes (on the copy stream).
    On a CPU, decoding stays on the compute thread: on a worker it fights compute for the same cores.
    A buffered disk read on a CPU is a copy out of the page cache that needs the same cores and memory
    bandwidth as compute, so a worker cannot hide it either: the kernel is asked to fetch the bytes into
    its cache ahead (WILLNEED), and the copy runs when the layer is needed. Direct reads (DMA, no core
    needed) always go to a worker.
    """

    def __init__(self, rt: Runtime, pos: int):
        self.rt, self.pos, self.future = rt, pos, None
        self.moves = bool(rt.streamed[pos])  # a layer whose weights are all bound (Runtime.bound) has no work
        if not self.moves:
            return
        # on a GPU, the compute enqueued so far: the slot's previous layer may be overwritten after it
        self.slot, self.ready = next(rt.loads) % 2, _compute_done(rt)
        self.decoded = rt.copy_stream is not None
        if rt.policy.overlap and rt.plans[pos].background:
            self.future = rt.io.submit(self._load)
        elif rt.policy.overlap:
            for name, sw in rt.streamed[pos].items():
                if isinstance(sw.store, DiskStore) and not rt.table_at_use(pos, name):
                    sw.store.prefetch(0, sw.codec.nbytes)

    def _load(self) -> dict:
        stored = read_layer(self.rt, self.pos, self.slot)
        return decode_layer(self.rt, self.pos, self.slot, stored, self.ready) if self.decoded else stored

    def result(self) -> dict[str, torch.Tensor | Table | PackedLinear]:
        bound = self.rt.bound[self.pos]
        if not self.moves:
            return bound
        done = self.future.result() if self.future is not None else self._load()
        return {**bound, **(done if self.decoded else decode_layer(self.rt, self.pos, self.slot, done))}

    def wait(self) -> None:
        if self.future is not None:
            self.future.result()


# -- the block ---------------------------------------------------------------------------------------------

# on_step(batch_no, step, last_logprobs (b, V) fp32, prompt_logprobs (b, L-1) or None)
#   -> next token ids (b,) on the compute device, and whether every row of the batch has finished
OnStep = Callable[[int, int, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, bool]]


@dataclass
class _StepCtx:
    positions: torch.Tensor  # (b, s) long
    allowed: torch.Tensor | None  # (b, s, t) bool: the keys each query may attend to; None: causal, no pads


class _Steps:
    """One GPU batch's positions and key masks, made on the compute device once per block.

    Each pass then takes a slice: a decode step adds one key, valid in every row, so its mask is a view
    and its positions one add, with nothing built per layer and nothing uploaded per step. A batch
    without pads needs no mask at all (engine.models.layers.attention), which lets SDPA pick its
    fused kernels.
    """

    def __init__(self, rows: Rows, steps: int, device: torch.device):
        mask = rows.mask.to(device)
        b, self.width = mask.shape
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        self.last = positions[:, -1:]  # each row's last prompt position
        self.valid: torch.Tensor | None = None  # key slots: the prompt's, then one per step
        if bool(rows.mask.all()):
            self.prefill = _StepCtx(positions, None)
        else:
            self.valid = torch.cat([mask, mask.new_ones(b, steps)], dim=1)
            causal = mask.new_ones(self.width, self.width).tril()
            self.prefill = _StepCtx(positions, self.valid[:, None, :self.width] & causal)

    def at(self, step: int) -> _StepCtx:
        if step == 0:
            return self.prefill
        return _StepCtx(self.last + step, None if self.valid is None else self.valid[:, None, :self.width + step])


def run_block(rt: Runtime, batches: list[Rows], steps: int, echo: bool, on_step: OnStep,
              on_pass: Callable[[int, float], None]) -> None:
    """Run `steps` forward passes (1 prefill + steps-1 decodes) over every GPU batch of one block.

    `on_pass(step, seconds)` follows each pass: its time, with the device synchronized.
    """
    cfg, adapter, n_layers = rt.cfg, rt.adapter, len(rt.specs)
    caches: list[list[LayerCache]] = []
    acts: list[Activation] = []
    inputs = [r.ids.to(rt.device) for r in batches]
    finished = [False] * len(batches)
    next_layer = None
    try:  # whatever was made before an error is given back in `finally`
        for _ in range(cfg.n_layers):
            caches.append([])
            for r in batches:
                caches[-1].append(LayerCache(rt, len(r.index), r.ids.shape[1] + steps))
        for r in batches:
            acts.append(Activation(rt, len(r.index) * r.ids.shape[1] * cfg.hidden))
        next_layer = LayerLoad(rt, 0)
        masks = [_Steps(r, steps, rt.device) for r in batches]
        for step in range(steps):
            start = time.perf_counter()
            ctxs = [m.at(step) for m in masks]
            for pos, spec in enumerate(rt.specs):
                w = next_layer.result()
                next_layer = None
                if not (step == steps - 1 and pos == n_layers - 1):
                    nxt = (pos + 1) % n_layers
                    next_layer = LayerLoad(rt, nxt)
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
                        inputs[k] = nxt.view(-1, 1)
                del w
            if rt.device.type == "cuda":
                torch.cuda.synchronize(rt.device)
            on_pass(step, time.perf_counter() - start)
            if all(finished):
                break
    finally:
        _release(next_layer, [c for layer in caches for c in layer], acts)


def _release(next_layer: LayerLoad | None, caches: list[LayerCache], acts: list[Activation]) -> None:
    """Give back every store of a block; the first error (a failed cache write) is raised after all are
    closed, unless another error already stopped the block, which is then the one reported."""
    if next_layer is not None:
        with contextlib.suppress(Exception):
            next_layer.wait()
    errors = []
    for item in [*caches, *acts]:
        try:
            item.close()
        except Exception as err:  # every store is closed, whatever one of them raised
            errors.append(err)
    if errors and sys.exc_info()[1] is None:
        raise errors[0]


def _fetch(rt: Runtime, cache: LayerCache) -> Future:
    return rt.submit(cache.fetch, background=cache.streams)


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
