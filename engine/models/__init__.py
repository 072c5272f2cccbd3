"""Model families as adapters: per-layer weight specs and small per-layer functions.

The block schedule drives any family through the same four calls, so it never knows which
architecture it runs. A model is a list of layers: one `embed`, `n_layers` `decoder`s, one `head`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from engine.config import ModelConfig

# attend(q, k, v, scale) -> out: q (b, s, hq, d), k/v (b, s, hkv, d); appends k/v to this layer's
# KV cache and attends over everything cached so far.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class LayerSpec:
    kind: str  # "embed", "decoder" or "head"
    index: int  # decoder index; -1 for embed and head
    shapes: dict[str, tuple[int, ...]]  # engine weight name -> shape
    sources: dict[str, tuple[str, ...]]  # engine weight name -> HF tensor names, concatenated on dim 0
    tables: tuple[str, ...] = ()  # vocabulary tables: used as engine.tables.Table, a slice at a time

    @property
    def name(self) -> str:
        return f"layer{self.index}" if self.kind == "decoder" else self.kind

    def nbytes(self, elem_bytes: int) -> int:
        return sum(math.prod(s) for s in self.shapes.values()) * elem_bytes


def adapter_for(cfg: ModelConfig) -> ModuleType:
    """The family module: layer_specs(cfg), embed(...), decoder(...), final(...)."""
    from engine.models import llama, opt

    return {"opt": opt, "llama": llama}[cfg.family]

