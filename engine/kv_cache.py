"""The KV cache and the activations of one GPU batch, split over the tiers as the policy says."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.models.layers import attention
from engine.placement import split_count
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
        stores: list[Store] = []
        try:  # a tier that refuses a store must not keep the ones made before it
            for tier, (h0, h1) in split_count(cfg.kv_heads, rt.policy.split("cache")).items():
                codec = RowCodec(batch * (h1 - h0) * d, rt.storage_dtype, rt.cache_quant, vector=d)
                size = max_len * codec.row_bytes
                device = torch.device("cpu") if (rt.policy.cpu_cache_compute and tier != "gpu") else rt.device
                dtype = torch.float32 if device.type == "cpu" else rt.compute_dtype
                for tag in ("k", "v"):
                    stores.append(rt.tiers[tier].store(size, tag))
                self.segments.append(_Segment(tier, (h0, h1), codec, stores[-2], stores[-1], device, dtype))
        except BaseException:
            for store in stores:
                store.close()
            raise

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
        """Wait for pending writes, then free the stores even when a write failed (and re-raise that)."""
        try:
            for fut in self.pending:
                fut.result()
        finally:
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
        # The disk share of n elements, n - round(share * n), never shrinks as n grows, so a store
        # sized for the largest activation holds every smaller one from offset 0.
        start, end = split_count(max_elems, self.split).get("disk", (0, 0))
        if end > start:
            itemsize = torch.empty((), dtype=rt.compute_dtype).element_size()
            self.disk = rt.tiers["disk"].store((end - start) * itemsize, "act")
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
