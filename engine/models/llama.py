"""LLaMA family: RMSNorm, RoPE, SwiGLU, grouped-query attention, tied or untied embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.config import ModelConfig
from engine.models.base import Attend, LayerSpec
from engine.models.layers import apply_rope, linear, rms_norm, rope_cos_sin


def layer_specs(cfg: ModelConfig) -> list[LayerSpec]:
    h, f, d = cfg.hidden, cfg.ffn, cfg.head_dim
    qkv_out = (cfg.n_heads + 2 * cfg.kv_heads) * d
    specs = [LayerSpec("embed", -1, {"tok": (cfg.vocab_size, h)}, {"tok": ("embed_tokens.weight",)}, tables=("tok",))]
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes = {"ln1.w": (h,), "qkv.w": (qkv_out, h), "o.w": (h, cfg.n_heads * d), "ln2.w": (h,),
                  "gate_up.w": (2 * f, h), "down.w": (h, f)}
        sources = {"ln1.w": (p + "input_layernorm.weight",),
                   "qkv.w": tuple(f"{p}self_attn.{x}_proj.weight" for x in "qkv"),
                   "o.w": (p + "self_attn.o_proj.weight",),
                   "ln2.w": (p + "post_attention_layernorm.weight",),
                   "gate_up.w": (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                   "down.w": (p + "mlp.down_proj.weight",)}
        if cfg.attention_bias:
            shapes["qkv.b"] = (qkv_out,)
            sources["qkv.b"] = tuple(f"{p}self_attn.{x}_proj.bias" for x in "qkv")
        specs.append(LayerSpec("decoder", i, shapes, sources))
    lm_src = ("embed_tokens.weight",) if cfg.tie_embeddings else ("lm_head.weight",)
    specs.append(LayerSpec("head", -1, {"ln.w": (h,), "lm_head": (cfg.vocab_size, h)},
                           {"ln.w": ("norm.weight",), "lm_head": lm_src}, tables=("lm_head",)))
    return specs


def embed(cfg: ModelConfig, w: dict, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return w["tok"][ids]


def decoder(cfg: ModelConfig, w: dict, h: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
    b, s, hidden = h.shape
    hq, hkv, d = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    h = h.view(b * s, hidden)  # tokens as the rows of one matrix: each linear is one product, with no reshapes
    x = rms_norm(h, w["ln1.w"], cfg.norm_eps)
    q, k, v = linear(x, w["qkv.w"], w.get("qkv.b")).split([hq * d, hkv * d, hkv * d], dim=-1)
    cos, sin = rope_cos_sin(positions, d, cfg.rope_theta, h.dtype)
    q = apply_rope(q.view(b, s, hq, d), cos, sin)
    k = apply_rope(k.view(b, s, hkv, d), cos, sin)
    a = attend(q, k, v.view(b, s, hkv, d), d**-0.5)
    h = h + linear(a.reshape(b * s, hq * d), w["o.w"])
    gate, up = linear(rms_norm(h, w["ln2.w"], cfg.norm_eps), w["gate_up.w"]).chunk(2, dim=-1)
    return (h + linear(F.silu(gate) * up, w["down.w"])).view(b, s, hidden)


def final(cfg: ModelConfig, w: dict, h: torch.Tensor) -> torch.Tensor:
    return rms_norm(h, w["ln.w"], cfg.norm_eps)
