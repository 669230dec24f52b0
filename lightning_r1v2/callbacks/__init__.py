"""Callbacks around a GRPO step: the Selective Sample Buffer, monitors and signals."""
from .buffer import SelectiveSampleBuffer
from .checkpoint import LastCheckpoint
from .dynamic_sampling import DynamicSampling
from .entropy import CriticalTokenEntropy
from .hallucination import HallucinationMonitor
from .hooks import RolloutHooks, call_rollout_hook, reward_callbacks, set_reward_weight, step_stats
from .interrupt import SaveOnInterrupt

__all__ = ["DynamicSampling", "LastCheckpoint", "SelectiveSampleBuffer", "CriticalTokenEntropy", "HallucinationMonitor", "RolloutHooks", "SaveOnInterrupt", "call_rollout_hook",
           "reward_callbacks", "set_reward_weight", "step_stats"]
