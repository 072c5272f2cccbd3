"""The KV cache and the activations of one GPU batch, split over the tiers as the policy says.

A cache segment (the KV heads one tier holds) is kept in one of two layouts:
- resident, a memory store on the device its attention runs on (the gpu tier; the cpu tier under
  CPU attention): per head, (batch, heads, max_len, ·), allocated once for the whole generation. Each
  pass writes its new positions in place and attention reads the prefix as a view, in the storage dtype:
  nothing is concatenated, converted or copied per step. Only a compressed cache is decoded, the
  prefix it attends over, since its decoded form is the size the compression saves.
- streamed, a store attention cannot read in place (disk; host memory attended on the GPU): token-major
  rows, so that a pass appends one contiguous range and the prefix is one contiguous read, fetched on
  an I/O worker ahead of use.
A compressed cache groups keys per channel over blocks of tokens by default (engine.channel_keys): then
its keys are whole coded blocks plus a window of the unfinished block's keys, in either layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.channel_keys import KeyBlocks, segment_bytes
from engine.models.layers import attention
from engine.placement import split_count
from engine.quant import groupwise
from engine.quant.codec import RowCodec
from engine.runtime import Runtime, Store
from engine.storage.tiers import DiskStore, MemoryStore


@dataclass
class _Segment:
    tier: str
    heads: tuple[int, int]
    codec: RowCodec
    k: Store
    v: Store
    device: torch.device  # where attention over this segment runs
    # Its precision: plain values are attended in the storage dtype, read in place (on a CPU, fused SDPA
    # over fp16/bf16 is fast, unlike a CPU's half-precision matmul); decoded ones in fp32 on a CPU.
    dtype: torch.dtype
    # resident: the token-major stores per head, viewing their bytes: K and V, or V alone beside coded key blocks
    views: tuple[torch.Tensor, ...] | None
    keys: KeyBlocks | None = None  # keys grouped per channel: k holds coded blocks, `window` the rest
    window: Store | None = None

    def count(self, written: int = 0, read: int = 0) -> None:
        """Account what a resident segment moves past its store's write/read (which count the same way):
        reads from the compute device's own memory are no transfer, so only other tiers count them."""
        tier = self.k.tier
        tier.count(written=written, read=0 if tier.name == "gpu" else read)


def _segment(rt: Runtime, tier: str, heads: tuple[int, int], codec: RowCodec, stores: dict[str, Store],
             batch: int, max_len: int) -> _Segment:
    device = torch.device("cpu") if (rt.policy.cpu_cache_compute and tier != "gpu") else rt.device
    k, v, window = stores["k"], stores["v"], stores.get("kw")
    keys = None if window is None else KeyBlocks(batch, heads[1] - heads[0], codec.vector, codec.storage, codec.quant)
    views = None
    if isinstance(k, MemoryStore) and k.buf.device.type == device.type:
        device = k.buf.device  # the buffer's own spelling (cuda:0), whatever the caller's was
        width = codec.vector if codec.quant is None else groupwise.row_nbytes(codec.vector, codec.quant)
        views = tuple((s.buf if codec.quant else s.buf.view(codec.storage)).view(batch, -1, max_len, width)
                      for s in ((k, v) if keys is None else (v,)))
    if codec.quant is None:
        dtype = codec.storage
    else:
        dtype = torch.float32 if device.type == "cpu" else rt.compute_dtype
    return _Segment(tier, heads, codec, k, v, device, dtype, views, keys, window)


class LayerCache:
    """K and V of one decoder layer for one GPU batch, split over the tiers by KV head."""

    def __init__(self, rt: Runtime, batch: int, max_len: int):
        cfg, d = rt.cfg, rt.cfg.head_dim
        self.rt, self.batch, self.max_len, self.length, self.pending = rt, batch, max_len, 0, []
        self.segments: list[_Segment] = []
        stores: list[Store] = []
        try:  # a tier that refuses a store must not keep the ones made before it
            for tier, (h0, h1) in split_count(cfg.kv_heads, rt.policy.split("cache")).items():
                codec = RowCodec(batch * (h1 - h0) * d, rt.storage_dtype, rt.cache_quant, vector=d)
                sizes = segment_bytes(batch, h1 - h0, d, max_len, rt.storage_dtype, rt.cache_quant,
                                      rt.policy.comp_cache_keys)
                made = {}
                for tag, nbytes in sizes.items():
                    made[tag] = rt.tiers[tier].store(nbytes, tag)
                    stores.append(made[tag])
                self.segments.append(_segment(rt, tier, (h0, h1), codec, made, batch, max_len))
        except BaseException:
            for store in stores:
                store.close()
            raise
        # a resident segment has nothing to fetch: its attention reads the store where it is
        self.streams = any(seg.views is None for seg in self.segments)

    def fetch(self) -> list:
        """Read the cached rows of the streamed segments, as (positions, batch, heads, d) (runs on a worker)."""
        for fut in self.pending:
            fut.result()
        self.pending = []
        out = []
        for seg in self.segments:
            if seg.views is not None or self.length == 0:
                out.append(None)
                continue
            n = self.length * seg.codec.row_bytes
            stores = (seg.k, seg.v) if seg.keys is None else (seg.v,)
            rows = tuple(seg.codec.decode(s.read(0, n), seg.device, seg.dtype)
                         .view(self.length, self.batch, -1, seg.codec.vector) for s in stores)
            out.append(rows if seg.keys is None else (*self._stored_keys(seg, _read_streamed), *rows))
        return out

    def _stored_keys(self, seg: _Segment, read, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Channel-grouped keys before this pass: the whole blocks decoded, head-major (b, heads, t, d), into the
        front of `out` when given; and the window (b, t, heads, d) in the storage dtype. `read(store, nbytes)`
        returns a store's first bytes."""
        lay, t0 = seg.keys, self.length
        first = t0 // lay.group * lay.group
        if out is None:
            out = torch.empty(self.batch, lay.heads, first, lay.dim, dtype=seg.dtype, device=seg.device)
        decoded = out[:, :, :first]
        if first:
            lay.decode_into(read(seg.k, first // lay.group * lay.block_bytes).to(seg.device), decoded)
        raw = read(seg.window, (t0 - first) * lay.token_bytes) if t0 > first else torch.empty(0, dtype=torch.uint8)
        return decoded, raw.view(lay.storage).view(-1, self.batch, lay.heads, lay.dim).to(seg.device).transpose(0, 1)

    def attend(self, fetched: list, allowed: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, scale: float) -> torch.Tensor:
        """Append this pass's K and V (b, s, hkv, d) at the cache's position and attend q (b, s, hq, d) over
        every cached position (engine.models.layers.attention says what `allowed` means)."""
        group, t0 = q.shape[2] // k.shape[2], self.length
        outs = []
        for seg, old in zip(self.segments, fetched, strict=True):
            h0, h1 = seg.heads
            qq, new = _arrive(seg, q[:, :, h0 * group:h1 * group], k[:, :, h0:h1], v[:, :, h0:h1])
            mask = None if allowed is None else allowed.to(seg.device)
            if seg.keys is not None:
                out = self._attend_by_channel(seg, qq, new, old, t0, mask, scale)
            else:
                keys = (self._in_place(seg, seg.views, new, t0) if seg.views is not None
                        else self._streamed(seg, (seg.k, seg.v), new, old, t0))
                out = attention(qq, *keys, mask, scale)
            outs.append(out.to(q.device, q.dtype))
        self.length = t0 + q.shape[1]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def attend_static(self, slot: torch.Tensor, allowed: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, scale: float) -> torch.Tensor:
        """`attend` with shapes that do not change from step to step, for a CUDA graph (schedule.DecodeGraph):
        one new position written at `slot` ((1,) long, on the device) and q attending over every slot of the
        cache, `allowed` ((b, 1, max_len) bool) saying which it may see. Every segment must be resident and
        plain, and the slots past the prompt zeroed (clear_ahead). Nothing here is counted or advanced:
        the host does that after each pass (advance)."""
        group, outs = q.shape[2] // k.shape[2], []
        for seg in self.segments:
            h0, h1 = seg.heads
            qq, new = _arrive(seg, q[:, :, h0 * group:h1 * group], k[:, :, h0:h1], v[:, :, h0:h1])
            for view, rows in zip(seg.views, new, strict=True):
                view.index_copy_(2, slot, rows.transpose(1, 2).to(view.dtype))
            keys = [view.transpose(1, 2) for view in seg.views]
            outs.append(attention(qq, *keys, allowed, scale).to(q.device, q.dtype))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def clear_ahead(self) -> None:
        """Zero the slots past the cached positions: attend_static multiplies them by a zero weight, and the
        garbage of a fresh allocation may hold NaN, which a zero weight does not cancel."""
        for seg in self.segments:
            for view in seg.views:
                view[:, :, self.length:].zero_()

    def advance(self, s: int) -> None:
        """Account `s` positions attend_static wrote, as `attend` counts its own."""
        for seg in self.segments:
            seg.count(written=2 * s * seg.codec.row_bytes, read=2 * (self.length + s) * seg.codec.row_bytes)
        self.length += s

    @staticmethod
    def _in_place(seg: _Segment, views, new, t0: int) -> list[torch.Tensor]:
        """Write the new positions into a resident segment's token-major views (K and V, or V alone); their
        prefix up to them, as (b, t, heads, d)."""
        s = new[0].shape[1]
        for view, rows in zip(views, new, strict=True):
            view[:, :, t0:t0 + s].copy_(rows.transpose(1, 2))
        seg.count(written=len(views) * s * seg.codec.row_bytes, read=len(views) * (t0 + s) * seg.codec.row_bytes)
        prefix = [view[:, :, :t0 + s] for view in views]
        if seg.codec.quant is not None:
            prefix = [groupwise.decode_rows(p, seg.codec.vector, seg.codec.quant, seg.dtype) for p in prefix]
        return [p.transpose(1, 2) for p in prefix]

    def _attend_by_channel(self, seg: _Segment, q: torch.Tensor, new, old: tuple | None, t0: int,
                           mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        """Attention over a segment whose keys are grouped per channel (engine.channel_keys): store the blocks
        this pass completes and the window's new keys, then attend each query block over the blocks before it
        as stored and the rest as computed. One keys buffer serves every query block: before a block's turn,
        the block before it is overwritten with its stored values."""
        lay, (k, v) = seg.keys, new
        s, group = k.shape[1], seg.keys.group
        total, first = t0 + s, t0 // group * group
        done = total // group * group
        keys = torch.empty(self.batch, lay.heads, total, lay.dim, dtype=seg.dtype, device=seg.device)
        if seg.views is not None:  # resident: the blocks decode straight into the keys attention reads
            _, window = self._stored_keys(seg, _read_in_place, keys)
            seg.count(read=first // group * lay.block_bytes + (t0 - first) * lay.token_bytes)
            (values,) = self._in_place(seg, seg.views, (v,), t0)
        else:  # streamed: decoded on the I/O worker ahead of use
            stored, window, old_values = old if old is not None else (*self._stored_keys(seg, _read_streamed), None)
            keys[:, :, :first] = stored
            (values,) = self._streamed(seg, (seg.v,), (v,), None if old is None else (old_values,), t0)
        computed = torch.cat((window, k.to(lay.storage)), dim=1)  # positions first .. total, (b, t, heads, d)
        keys[:, :, first:] = computed.transpose(1, 2)
        blocks = lay.encode(computed[:, :done - first]) if done > first else None
        start = max(done, t0)  # what the window holds after this pass, from slot start - done
        self._write(seg, ((seg.k, first // group * lay.block_bytes, blocks),
                          (seg.window, (start - done) * lay.token_bytes, computed[:, start - first:])))
        outs = []
        for lo in range(first, total, group):  # the query blocks of this pass
            if lo > first:
                lay.decode_into(blocks[(lo - group - first) // group], keys[:, :, lo - group:lo])
            a, b = max(lo, t0) - t0, min(lo + group, total) - t0
            part = mask[:, a:b] if mask is not None else None if a == 0 and b == s else _causal(t0 + a, t0 + b, total,
                                                                                               q.device)
            outs.append(attention(q[:, a:b], keys.transpose(1, 2), values, part, scale))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _write(self, seg: _Segment, writes) -> None:
        """Store (store, offset, data) writes of a channel-grouped segment: blocks as coded bytes, window keys
        (b, t, heads, d) token-major; in place into a resident segment, queued on the I/O worker otherwise."""
        parts = []
        for store, offset, data in writes:
            if data is None or data.numel() == 0:
                continue
            if data.dtype != torch.uint8:
                data = data.transpose(0, 1).contiguous().view(torch.uint8)
            parts.append((store, offset, data))
        if seg.views is not None:
            for store, offset, data in parts:
                flat = data.reshape(-1)
                store.buf[offset:offset + flat.numel()].copy_(flat)
                seg.count(written=flat.numel())
        elif parts:
            self.pending.append(self.rt.submit(_write_parts, parts))

    def _streamed(self, seg: _Segment, stores, new, old: tuple | None, t0: int) -> list[torch.Tensor]:
        """Queue the new rows' write to a streamed segment's token-major stores (K and V, or V alone); the
        fetched prefix and the new rows, (b, t, heads, d)."""
        s = new[0].shape[1]
        if seg.codec.quant is None:
            new = [x.to(seg.codec.storage) for x in new]
        rows = [x.transpose(0, 1).reshape(s, -1).view(torch.uint8) for x in new]
        self.pending.append(self.rt.submit(_write_rows, stores, t0 * seg.codec.row_bytes, rows))
        if seg.codec.quant is not None:  # attention sees exactly what the cache holds
            new = [groupwise.decode_rows(x, seg.codec.vector, seg.codec.quant, seg.dtype) for x in new]
        if old is None:
            return list(new)
        return [torch.cat((o, x.transpose(0, 1))).transpose(0, 1) for o, x in zip(old, new, strict=True)]

    def close(self) -> None:
        """Wait for pending writes, then free the stores even when a write failed (and re-raise that)."""
        try:
            for fut in self.pending:
                fut.result()
        finally:
            for seg in self.segments:
                seg.views = None  # the views would keep the freed buffers alive
                for store in (seg.k, seg.v, seg.window):
                    if store is not None:
                        store.close()


def _arrive(seg: _Segment, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """A segment's q in its precision, and its new K and V ((b, s, heads, ·) each) on its attention device:
    coded vectors if compressed, else values (in the storage dtype where they moved). Encoded or converted
    where they were computed, K and V cross to another device (CPU attention beside a GPU) in one copy;
    on the same device a plain cache's conversion is left to the copy that stores them."""
    quant = seg.codec.quant
    if quant is not None and seg.keys is not None:  # keys are coded by the block, where they are stored
        new = [k.to(seg.codec.storage).to(seg.device), groupwise.encode_rows(v, quant).to(seg.device)]
    else:
        new = [k, v] if quant is None else [groupwise.encode_rows(x, quant) for x in (k, v)]
        if k.device.type != seg.device.type:
            stacked = torch.stack(new)  # converted first, on the device that computed it: fewer bytes cross
            new = stacked.to(stacked.dtype if quant else seg.codec.storage).to(seg.device)
    return q.to(seg.device, seg.dtype), new


def _write_rows(stores, offset: int, encoded) -> None:
    for store, data in zip(stores, encoded, strict=True):
        store.write(offset, data)


def _causal(q0: int, q1: int, total: int, device: torch.device) -> torch.Tensor:
    """(1, q1 − q0, total): queries at positions q0 .. q1 − 1 each see the keys up to their own."""
    return (torch.arange(total, device=device)[None, :] <= torch.arange(q0, q1, device=device)[:, None])[None]


def _read_in_place(store: MemoryStore, nbytes: int) -> torch.Tensor:
    return store.buf[:nbytes]


def _read_streamed(store: Store, nbytes: int) -> torch.Tensor:
    return store.read(0, nbytes)


def _write_parts(parts) -> None:
    for store, offset, data in parts:
        store.write(offset, data)


# -- activations -----------------------------------------------------------------------------------------

class Activation:
    """One GPU batch's hidden states between layers, split over the tiers by element."""

    def __init__(self, rt: Runtime, max_elems: int):
        self.rt, self.split = rt, rt.policy.split("act")
        self.disk: DiskStore | None = None
        # The disk share of n elements, n - round(share * n), never shrinks as n grows, so a store
        # sized for the largest activation holds every smaller one from offset 0.
        start, end = split_count(max_elems, self.split).get("disk", (0, 0))
        if end > start:
            self.disk = rt.tiers["disk"].store((end - start) * rt.compute_dtype.itemsize, "act")
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
                dtype = self.rt.compute_dtype
                parts.append(self.disk.read(0, n * dtype.itemsize).view(dtype).to(self.rt.device))
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
