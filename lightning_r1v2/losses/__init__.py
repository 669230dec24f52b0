"""Loss maths for SFT, MPO and GRPO: pure functions returning ``(loss, detached stats)``."""

from lightning_r1v2.losses.common import entropy_from_logits, masked_mean, token_logprobs
from lightning_r1v2.losses.correction import rollout_correction_weights
from lightning_r1v2.losses.grpo import group_advantages, grpo_loss, k3_kl, micro_batch_weights
from lightning_r1v2.losses.high_entropy import high_entropy_mask
from lightning_r1v2.losses.mpo import RunningMean, mpo_loss, mpo_rewards
from lightning_r1v2.losses.sft import sft_loss, shift_for_causal_lm

__all__ = [
    "RunningMean",
    "entropy_from_logits",
    "group_advantages",
    "grpo_loss",
    "high_entropy_mask",
    "k3_kl",
    "masked_mean",
    "micro_batch_weights",
    "mpo_loss",
    "mpo_rewards",
    "rollout_correction_weights",
    "sft_loss",
    "shift_for_causal_lm",
    "token_logprobs",
]
