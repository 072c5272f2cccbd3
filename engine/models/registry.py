"""Model families by name, and what follows from a config and its family's layer specs."""

from __future__ import annotations

import math

from engine.config import ModelConfig
from engine.models import llama, opt
from engine.models.base import ModelAdapter

FAMILIES: dict[str, ModelAdapter] = {"opt": opt, "llama": llama}


def adapter_for(cfg: ModelConfig) -> ModelAdapter:
    """The family module: layer_specs(cfg), embed(...), decoder(...), final(...)."""
    return FAMILIES[cfg.family]


def num_params(cfg: ModelConfig) -> int:
    """Parameter count (tied embeddings counted once)."""
    specs = adapter_for(cfg).layer_specs(cfg)
    total = sum(math.prod(shape) for spec in specs for shape in spec.shapes.values())
    return total - (math.prod(specs[-1].shapes["lm_head"]) if cfg.tie_embeddings else 0)
