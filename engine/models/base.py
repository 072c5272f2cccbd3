"""What every model family provides: per-layer weight specs and four small layer functions.

The block schedule drives any family through the same calls (`ModelAdapter`), so it never knows
which architecture it runs. A model is a list of layers: one `embed`, `n_layers` `decoder`s, one `head`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from engine.config import ModelConfig

# attend(q, k, v, scale) -> out: q (b, s, hq, d), k/v (b, s, hkv, d); appends k/v to this layer's
# KV cache and attends over everything cached so far.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

# A layer's weights in compute form, by engine weight name: tensors, or forms with their own
# `linear` / `__getitem__` (vocabulary tables, packed int4, weights read at use).
LayerWeights = dict[str, Any]


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


class ModelAdapter(Protocol):
    """A model family (a module such as engine.models.opt), as the schedule sees it."""

    def layer_specs(self, cfg: ModelConfig) -> list[LayerSpec]: ...

    def embed(self, cfg: ModelConfig, w: LayerWeights, ids: torch.Tensor,
              positions: torch.Tensor) -> torch.Tensor: ...

    def decoder(self, cfg: ModelConfig, w: LayerWeights, h: torch.Tensor, positions: torch.Tensor,
                attend: Attend) -> torch.Tensor: ...

    def final(self, cfg: ModelConfig, w: LayerWeights, h: torch.Tensor) -> torch.Tensor: ...
