"""flexhelm's offloading inference engine: OPT and LLaMA over gpu, cpu and disk tiers."""

from engine.api import Engine, Generation
from engine.errors import UserError
from engine.policy import Policy

__all__ = ["Engine", "Generation", "Policy", "UserError"]
