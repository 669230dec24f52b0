"""Rollout engines and the ``Rollouts`` batch type. vLLM is imported lazily, never here."""
from .base import RolloutEngine
from .hf_engine import HFGenerateEngine
from .types import Rollouts

__all__ = ["HFGenerateEngine", "RolloutEngine", "Rollouts"]
