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
from engine.policy import Policy
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
    pending = rt.uploads[slot % len(rt.uploads)]
    if pending is not None:  # the upload that last read this staging slot (two loads ago) must be done
        pending.synchronize()
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

    `ready` (CUDA) marks when the compute stream is done with the layer that last used this slot. On a GPU
    the work is only enqueued on the copy stream; `uploaded` gives the event the compute stream waits on.
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
    return out


def uploaded(rt: Runtime, slot: int) -> torch.cuda.Event:
    """An event after the copy stream's work so far: the layer loaded into `slot` is on the device after it,
    and the slot's staging buffer free again (read_layer waits on it before reusing the buffer, two loads
    later). The compute stream waits on it, the host does not: uploads of a ring of slots stay in flight."""
    event = torch.cuda.Event()
    event.record(rt.copy_stream)
    rt.uploads[slot % len(rt.uploads)] = event
    return event


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
        self.rt, self.pos, self.future, self.loaded = rt, pos, None, None
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
        if not self.decoded:
            return stored
        out = decode_layer(self.rt, self.pos, self.slot, stored, self.ready)
        self.loaded = uploaded(self.rt, self.slot)
        return out

    def result(self) -> dict[str, torch.Tensor | Table | PackedLinear]:
        bound = self.rt.bound[self.pos]
        if not self.moves:
            return bound
        done = self.future.result() if self.future is not None else self._load()
        if self.loaded is not None:  # the compute stream, not the host, waits for the upload
            torch.cuda.current_stream(self.rt.device).wait_event(self.loaded)
        return {**bound, **(done if self.decoded else decode_layer(self.rt, self.pos, self.slot, done))}

    def wait(self) -> None:
        if self.future is not None:
            self.future.result()


# -- the block ---------------------------------------------------------------------------------------------

# on_step(batch_no, step, last_logprobs (b, V) fp32, prompt_logprobs (b, L-1) or None)
#   (with top1, prompt_logprobs is (2, b, L-1) float64: the log-probs, then each position's most likely token id)
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


# -- decode steps as CUDA graphs ------------------------------------------------------------------------------

def graph_blocker(policy: Policy, device: torch.device, all_bound: bool) -> str | None:
    """Why a decode step cannot be replayed as a CUDA graph, or None when it can.

    A graph replays fixed kernels on fixed addresses, so a step qualifies only where nothing moves between
    tiers and nothing is read back or handed to a worker inside it: every weight bound on the device
    (Runtime.bound), the whole KV cache resident on the gpu tier and plain (compressed, its decoded
    prefix would grow), every activation on the gpu tier.
    """
    if not policy.cuda_graphs:
        return "--no-cuda-graphs"
    if device.type != "cuda":
        return "not on a CUDA device"
    if not all_bound:
        return "weights are loaded per step (not all on the gpu tier in compute form)"
    if policy.split("cache")["gpu"] < 1 or policy.compress_cache:
        return "the KV cache is not all on the gpu tier, or is compressed"
    if policy.split("act")["gpu"] < 1:
        return "activations are not all on the gpu tier"
    return None


def capture(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """`fn`'s kernels recorded once as a CUDA graph; the function returned replays them, and returns the
    tensor `fn` returned, refilled. `fn` runs once first on a side stream, as torch asks, so that lazy
    initialisation and kernel choice happen outside the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay() -> torch.Tensor:
        graph.replay()
        return out
    return replay


class DecodeGraph:
    """One GPU batch's decode pass with static shapes: the next tokens, their positions, the cache slot they
    go to and the keys each row may see are copied into fixed tensors, then the pass (every layer and the
    LM head's log-probs) runs as one replayed CUDA graph, with no Python per layer.

    The graph is captured at the batch's first decode step. If capturing fails, for any reason, the failure
    is said once (Runtime.graph_failures) and the pass runs eagerly: the same static pass, uncaptured.
    """

    def __init__(self, rt: Runtime, caches: list[LayerCache], steps: _Steps):
        self.rt, self.caches = rt, caches
        b, t, dev = caches[0].batch, caches[0].max_len, rt.device
        self.tokens = torch.zeros(b, 1, dtype=torch.long, device=dev)
        self.positions = torch.zeros(b, 1, dtype=torch.long, device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        self.keys = steps.valid if steps.valid is not None else torch.ones(b, t, dtype=torch.bool, device=dev)
        self.order = torch.arange(t, device=dev)
        self.allowed = torch.zeros(b, 1, t, dtype=torch.bool, device=dev)
        self.replay: Callable[[], torch.Tensor] | None = None
        for cache in caches:
            cache.clear_ahead()

    def _pass(self) -> torch.Tensor:
        rt, cfg, x, last = self.rt, self.rt.cfg, None, None
        for pos, spec in enumerate(rt.specs):
            w = rt.bound[pos]
            if spec.kind == "embed":
                x = rt.adapter.embed(cfg, w, self.tokens, self.positions)
            elif spec.kind == "decoder":
                attend = functools.partial(self.caches[spec.index].attend_static, self.slot, self.allowed)
                x = rt.adapter.decoder(cfg, w, x, self.positions, attend)
            else:
                last, _ = _head(rt, w, x, None, False)
        return last

    def run(self, tokens: torch.Tensor, ctx: _StepCtx) -> torch.Tensor:
        """Log-probs (b, V) of the next token after `tokens` (b, 1), valid until the next run."""
        t0 = self.caches[0].length
        self.tokens.copy_(tokens)
        self.positions.copy_(ctx.positions)
        self.slot.fill_(t0)
        torch.logical_and(self.keys[:, None, :], self.order <= t0, out=self.allowed)
        if self.replay is None:
            self.replay = self._captured()
        out = self.replay()
        for cache in self.caches:
            cache.advance(1)
        return out

    def _captured(self) -> Callable[[], torch.Tensor]:
        if self.rt.graph_failures:  # said once already: eager from then on
            return self._pass
        try:
            return capture(self._pass)
        except Exception as err:  # a capture failure of any kind must not stop generation
            reason = f"{type(err).__name__}: {err}".splitlines()[0][:200]
            self.rt.graph_failures.append(reason)
            print(f"cuda graphs: capturing a decode step failed ({reason}); running decode steps eagerly "
                  "(--no-cuda-graphs silences this)", file=sys.stderr)
            return self._pass


def run_block(rt: Runtime, batches: list[Rows], steps: int, echo: bool, on_step: OnStep,
              on_pass: Callable[[int, float], None], top1: bool = False) -> None:
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
        graphed = graph_blocker(rt.policy, rt.device, not any(rt.streamed)) is None
        graphs: list[DecodeGraph] = []
        for step in range(steps):
            start = time.perf_counter()
            ctxs = [m.at(step) for m in masks]
            if step and graphed:  # the whole pass of each GPU batch as one graph; no layer loop
                graphs = graphs or [DecodeGraph(rt, [layer[k] for layer in caches], m) for k, m in enumerate(masks)]
                for k, graph in enumerate(graphs):
                    nxt, finished[k] = on_step(k, step, graph.run(inputs[k], ctxs[k]), None)
                    inputs[k] = nxt.view(-1, 1)
            layers = () if step and graphed else rt.specs
            for pos, spec in enumerate(layers):
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
                        last_lp, prompt_lp = _head(rt, w, x, rows, echo and step == 0, top1)
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


def _head(rt: Runtime, w: dict, x: torch.Tensor, rows: Rows, echo: bool, top1: bool = False):
    """Log-probs of the next token, and with `echo` of every prompt token after the first; with `top1` also
    the most likely token at each of those positions, read from the same chunks of logits."""
    lm = w["lm_head"]
    h = rt.adapter.final(rt.cfg, w, x if echo else x[:, -1:])
    last = torch.log_softmax(lm.linear(h[:, -1]).float(), dim=-1)
    if not echo:
        return last, None
    targets, chunk, parts, tops = rows.ids.to(rt.device), 64, [], []
    for i in range(0, h.shape[1] - 1, chunk):
        lp = torch.log_softmax(lm.linear(h[:, i:i + chunk]).float(), dim=-1)
        tgt = targets[:, i + 1:i + 1 + lp.shape[1]]
        parts.append(lp[:, :tgt.shape[1]].gather(-1, tgt[..., None])[..., 0])
        if top1:
            tops.append(lp[:, :tgt.shape[1]].argmax(-1))
    prompt_lp = torch.cat(parts, dim=1) if parts else torch.empty(h.shape[0], 0, device=rt.device)
    if top1:  # one tensor, so the caller reads both back at once (float64 holds every token id exactly)
        top = torch.cat(tops, dim=1) if tops else prompt_lp.long()
        return last, torch.stack((prompt_lp.double(), top.double()))
    return last, prompt_lp
