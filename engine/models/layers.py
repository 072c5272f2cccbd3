"""Layer math shared by the model families: plain functions over plain tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.quant.int4_kernel import PackedLinear


def linear(x: torch.Tensor, w: torch.Tensor | PackedLinear, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T + b, where w is a tensor or a weight form with its own `linear` (packed int4, read at use)."""
    return F.linear(x, w, b) if isinstance(w, torch.Tensor) else w.linear(x, b)


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return w * x32.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables (b, s, head_dim) for rotary embeddings at the given positions."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (b, s, heads, head_dim); HF's rotate-half convention."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
              scale: float) -> torch.Tensor:
    """Grouped-query attention through one fused SDPA call, which reads K and V in place at any strides
    (a KV cache's per-head prefix views included): no repeated KV heads, no copy of the cache.

    q: (b, s, hq, d); k, v: (b, t, hkv, d), query head i using KV head i // (hq / hkv) as HF does;
    allowed: (b, s, t) bool, or None when no row is padded: then each query sees the keys up to its own
    position, which for s > 1 needs t == s (a prefill into an empty cache). Returns (b, s, hq, d).
    Rows with no allowed key (left pads) attend uniformly instead of producing NaN: the mask is a finite
    additive one, since a NaN in a pad's K or V would reach every row through a zero weight.
    """
    mask = None
    if allowed is not None:
        mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
        mask = mask.masked_fill_(~allowed, torch.finfo(q.dtype).min)[:, None]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         is_causal=allowed is None and q.shape[1] > 1, scale=scale,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)
