"""flexhelm's offloading inference engine: OPT and LLaMA over gpu, cpu and disk tiers."""

from engine.api import Engine
from engine.errors import UserError
from engine.generation import Generation, GenerationStats
from engine.policy import Policy

__all__ = ["Engine", "Generation", "GenerationStats", "Policy", "UserError"]
