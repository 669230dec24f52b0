"""Reward functions, their sandbox, their combination and the callback that runs them.

Every reward function has TRL's shape, ``fn(completions, **columns) -> list[float | None]``
(None = not applicable), and is a picklable top-level callable.
"""
from lightning_r1v2.rewards.callback import RewardCallback
from lightning_r1v2.rewards.code import code_reward, extract_code
from lightning_r1v2.rewards.combine import combine_rewards
from lightning_r1v2.rewards.faults import RewardFault
from lightning_r1v2.rewards.grounding import grounding_reward
from lightning_r1v2.rewards.reward_model import RewardModelScorer, build_tiny_reward_model
from lightning_r1v2.rewards.rules import accuracy_reward, extract_boxed, format_reward, is_correct, normalize_answer
from lightning_r1v2.rewards.sandbox import SandboxPool, SandboxResult, run_program

__all__ = [
    "format_reward",
    "accuracy_reward",
    "grounding_reward",
    "extract_boxed",
    "normalize_answer",
    "is_correct",
    "code_reward",
    "extract_code",
    "combine_rewards",
    "RewardCallback",
    "RewardFault",
    "RewardModelScorer",
    "build_tiny_reward_model",
    "run_program",
    "SandboxPool",
    "SandboxResult",
]
