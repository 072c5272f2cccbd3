"""OPT (125m ... 175b), including OPT-350m's project_in/out and post-layer-norm."""

from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.models.base import Attend, LayerSpec
from engine.models.layers import layer_norm, linear


def layer_specs(cfg: ModelConfig) -> list[LayerSpec]:
    h, e, f, p = cfg.hidden, cfg.embed_dim, cfg.ffn, "decoder."
    embed = {"tok": (cfg.vocab_size, e), "pos": (cfg.max_positions + 2, h)}
    embed_src = {"tok": (p + "embed_tokens.weight",), "pos": (p + "embed_positions.weight",)}
    if e != h:
        embed["proj_in"], embed_src["proj_in"] = (h, e), (p + "project_in.weight",)
    specs = [LayerSpec("embed", -1, embed, embed_src, tables=("tok", "pos"))]
    for i in range(cfg.n_layers):
        q = f"{p}layers.{i}."
        att = q + "self_attn."
        shapes = {"ln1.w": (h,), "ln1.b": (h,), "qkv.w": (3 * h, h), "qkv.b": (3 * h,), "o.w": (h, h),
                  "o.b": (h,), "ln2.w": (h,), "ln2.b": (h,), "fc1.w": (f, h), "fc1.b": (f,),
                  "fc2.w": (h, f), "fc2.b": (h,)}
        sources = {
            "ln1.w": (q + "self_attn_layer_norm.weight",), "ln1.b": (q + "self_attn_layer_norm.bias",),
            "qkv.w": tuple(f"{att}{x}_proj.weight" for x in "qkv"),
            "qkv.b": tuple(f"{att}{x}_proj.bias" for x in "qkv"),
            "o.w": (att + "out_proj.weight",), "o.b": (att + "out_proj.bias",),
            "ln2.w": (q + "final_layer_norm.weight",), "ln2.b": (q + "final_layer_norm.bias",),
            "fc1.w": (q + "fc1.weight",), "fc1.b": (q + "fc1.bias",),
            "fc2.w": (q + "fc2.weight",), "fc2.b": (q + "fc2.bias",),
        }
        specs.append(LayerSpec("decoder", i, shapes, sources))
    head, head_src = {}, {}
    if cfg.final_layer_norm:
        head |= {"ln.w": (h,), "ln.b": (h,)}
        head_src |= {"ln.w": (p + "final_layer_norm.weight",), "ln.b": (p + "final_layer_norm.bias",)}
    if e != h:
        head["proj_out"], head_src["proj_out"] = (e, h), (p + "project_out.weight",)
    head["lm_head"] = (cfg.vocab_size, e)
    head_src["lm_head"] = (p + "embed_tokens.weight",) if cfg.tie_embeddings else ("lm_head.weight",)
    specs.append(LayerSpec("head", -1, head, head_src, tables=("lm_head",)))
    return specs


def embed(cfg: ModelConfig, w: dict, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    x = w["tok"][ids]
    if "proj_in" in w:
        x = linear(x, w["proj_in"])
    return x + w["pos"][positions + 2]  # OPT's learned positions are offset by 2


def decoder(cfg: ModelConfig, w: dict, h: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
    b, s, hidden = h.shape
    heads, d = cfg.n_heads, cfg.head_dim
    pre = cfg.pre_layer_norm
    h = h.view(b * s, hidden)  # tokens as the rows of one matrix: each linear is one product, with no reshapes
    x = layer_norm(h, w["ln1.w"], w["ln1.b"]) if pre else h
    q, k, v = linear(x, w["qkv.w"], w["qkv.b"]).split(hidden, dim=-1)
    q = q * d**-0.5
    a = attend(q.view(b, s, heads, d), k.view(b, s, heads, d), v.view(b, s, heads, d), 1.0)
    h = h + linear(a.reshape(b * s, hidden), w["o.w"], w["o.b"])
    if not pre:
        h = layer_norm(h, w["ln1.w"], w["ln1.b"])
    x = layer_norm(h, w["ln2.w"], w["ln2.b"]) if pre else h
    h = h + linear(linear(x, w["fc1.w"], w["fc1.b"]).relu_(), w["fc2.w"], w["fc2.b"])
    return (h if pre else layer_norm(h, w["ln2.w"], w["ln2.b"])).view(b, s, hidden)


def final(cfg: ModelConfig, w: dict, h: torch.Tensor) -> torch.Tensor:
    if "ln.w" in w:
        h = layer_norm(h, w["ln.w"], w["ln.b"])
    if "proj_out" in w:
        h = linear(h, w["proj_out"])
    return h
