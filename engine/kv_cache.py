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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    views: tuple[torch.Tensor, torch.Tensor] | None  # resident: K and V per head, viewing the stores' bytes

    def count(self, written: int = 0, read: int = 0) -> None:
        """Account what a resident segment moves past its store's write/read (which count the same way):
        reads from the compute device's own memory are no transfer, so only other tiers count them."""
        tier = self.k.tier
        tier.count(written=written, read=0 if tier.name == "gpu" else read)


def _segment(rt: Runtime, tier: str, heads: tuple[int, int], codec: RowCodec, k: Store, v: Store, batch: int,
             max_len: int) -> _Segment:
    device = torch.device("cpu") if (rt.policy.cpu_cache_compute and tier != "gpu") else rt.device
    views = None
    if isinstance(k, MemoryStore) and k.buf.device.type == device.type:
        device = k.buf.device  # the buffer's own spelling (cuda:0), whatever the caller's was
        width = codec.vector if codec.quant is None else groupwise.row_nbytes(codec.vector, codec.quant)
        views = tuple((s.buf if codec.quant else s.buf.view(codec.storage)).view(batch, -1, max_len, width)
                      for s in (k, v))
    if codec.quant is None:
        dtype = codec.storage
    else:
        dtype = torch.float32 if device.type == "cpu" else rt.compute_dtype
    return _Segment(tier, heads, codec, k, v, device, dtype, views)


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
                for tag in ("k", "v"):
                    stores.append(rt.tiers[tier].store(max_len * codec.row_bytes, tag))
                self.segments.append(_segment(rt, tier, (h0, h1), codec, stores[-2], stores[-1], batch, max_len))
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
            out.append(tuple(seg.codec.decode(s.read(0, n), seg.device, seg.dtype)
                             .view(self.length, self.batch, -1, seg.codec.vector) for s in (seg.k, seg.v)))
        return out

    def attend(self, fetched: list, allowed: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, scale: float) -> torch.Tensor:
        """Append this pass's K and V (b, s, hkv, d) at the cache's position and attend q (b, s, hq, d) over
        every cached position (engine.models.layers.attention says what `allowed` means)."""
        group, t0 = q.shape[2] // k.shape[2], self.length
        outs = []
        for seg, old in zip(self.segments, fetched, strict=True):
            h0, h1 = seg.heads
            qq, new = _arrive(seg, q[:, :, h0 * group:h1 * group], k[:, :, h0:h1], v[:, :, h0:h1])
            keys = self._in_place(seg, new, t0) if seg.views is not None else self._streamed(seg, new, old, t0)
            mask = None if allowed is None else allowed.to(seg.device)
            outs.append(attention(qq, *keys, mask, scale).to(q.device, q.dtype))
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
    def _in_place(seg: _Segment, new, t0: int) -> list[torch.Tensor]:
        """Write the new positions into a resident segment; its K and V up to them, as (b, t, heads, d)."""
        s = new[0].shape[1]
        for view, rows in zip(seg.views, new, strict=True):
            view[:, :, t0:t0 + s].copy_(rows.transpose(1, 2))
        seg.count(written=2 * s * seg.codec.row_bytes, read=2 * (t0 + s) * seg.codec.row_bytes)
        prefix = [view[:, :, :t0 + s] for view in seg.views]
        if seg.codec.quant is not None:
            prefix = [groupwise.decode_rows(p, seg.codec.vector, seg.codec.quant, seg.dtype) for p in prefix]
        return [p.transpose(1, 2) for p in prefix]

    def _streamed(self, seg: _Segment, new, old: tuple | None, t0: int) -> list[torch.Tensor]:
        """Queue the new rows' write to a streamed segment; the fetched prefix and the new rows, (b, t, heads, d)."""
        s = new[0].shape[1]
        if seg.codec.quant is None:
            new = [x.to(seg.codec.storage) for x in new]
        rows = [x.transpose(0, 1).reshape(s, -1).view(torch.uint8) for x in new]
        self.pending.append(self.rt.submit(_write_rows, (seg.k, seg.v), t0 * seg.codec.row_bytes, rows))
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
                seg.k.close()
                seg.v.close()


def _arrive(seg: _Segment, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """A segment's q in its precision, and its new K and V ((b, s, heads, ·) each) on its attention device:
    coded vectors if compressed, else values (in the storage dtype where they moved). Encoded or converted
    where they were computed, K and V cross to another device (CPU attention beside a GPU) in one copy;
    on the same device a plain cache's conversion is left to the copy that stores them."""
    new = [k, v] if seg.codec.quant is None else [groupwise.encode_rows(x, seg.codec.quant) for x in (k, v)]
    if k.device.type != seg.device.type:
        stacked = torch.stack(new)  # converted first, on the device that computed it: fewer bytes cross
        new = stacked.to(stacked.dtype if seg.codec.quant else seg.codec.storage).to(seg.device)
    return q.to(seg.device, seg.dtype), new


def _write_rows(stores, offset: int, encoded) -> None:
    for store, data in zip(stores, encoded, strict=True):
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
