"""Rollout engines and the ``Rollouts`` batch type. vLLM is imported lazily, never here."""
from .hf_engine import HFGenerateEngine
from .types import Rollouts

__all__ = ["HFGenerateEngine", "Rollouts"]
