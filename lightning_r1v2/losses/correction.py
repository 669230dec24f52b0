"""Rollout correction: importance weights for the rollout engine's log-probs differing from the trainer's.

The engine that samples (vLLM, or a compiled / bf16 HF engine) computes the sampled tokens'
probabilities with other numerics than the trainer's forward, so the samples come from
pi_rollout, not from pi_old (the trainer's policy before the update). Truncated importance
sampling (TIS; Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
training", https://fengyao.notion.site/off-policy-rl) reweights the PPO surrogate, whose ratio
keeps pi_old (the trainer's) as its denominator:

    L = -E_{y ~ pi_rollout} [ w_t * min(rho_t A, clip(rho_t, 1-eps_lo, 1+eps_hi) A) ],
    rho_t = pi_theta(y_t) / pi_old(y_t),    w = pi_old / pi_rollout (detached),

    token level:     w_t = exp(logp_old_t - logp_rollout_t)
    sequence level:  w_i = exp(sum_t (logp_old_t - logp_rollout_t))   (the product of the token ratios)
    truncate:        w <- min(w, C)                                    (TIS)
    mask:            w <- w if C_low <= w <= C else 0                  (TRL's *_mask; IcePop, arXiv 2510.18855)

Departures, and why:
- Mask mode keeps the weight w inside the band (TRL, IcePop) rather than 1 (verl's rejection
  sampling); tokens or sequences outside it are zeroed but stay in the loss's denominator (as TRL),
  so masking never changes how the loss is normalised.
- The weight is formed in log space, ``exp(min(log w, log C))``: a sequence-level sum of
  log-ratios over thousands of tokens cannot overflow.
- ``cap_low`` None means no lower edge (TRL); the brief's band [1/C, C] is ``cap_low = 1 / cap``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_r1v2.losses.common import masked_mean

MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def rollout_correction_weights(
    trainer_logprobs: Tensor,
    rollout_logprobs: Tensor,
    mask: Tensor,
    mode: str = "token_truncate",
    cap: float = 2.0,
    cap_low: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Importance weights w = pi_old / pi_rollout, truncated or masked (equations in the module doc).

    Args:
        trainer_logprobs: ``[N, T]`` log pi_old of the sampled tokens, from the trainer's forward
            before the update (no grad).
        rollout_logprobs: ``[N, T]`` log pi_rollout, recorded by the engine while sampling.
        mask: ``[N, T]`` 1 on response tokens.
        mode: ``token_truncate``, ``token_mask``, ``sequence_truncate`` or ``sequence_mask``.
        cap: C > 0, the upper edge.
        cap_low: lower edge of the mask band (mask modes only; None: none). Must be < ``cap``.

    Returns:
        ``(weights, stats)``: weights ``[N, T]`` detached, 0 at padding; stats (0-dim, detached):
        ``rollout_correction/log_ratio_abs_mean`` (mean |logp_old - logp_rollout| over response
        tokens: the mismatch), ``rollout_correction/weight_mean`` (mean applied weight over
        response tokens), ``rollout_correction/capped_share`` (share of tokens, or of sequences with
        >= 1 token at sequence level, whose weight was truncated or masked).

    Example: token log-ratios [ln 3, ln 0.5] with C = 2: truncate -> [2, 0.5]; mask -> [0, 0.5];
    mask with cap_low 0.6 -> [0, 0].
    """
    if mode not in MODES:
        raise ValueError(f"rollout correction mode must be one of {MODES}, got {mode!r}")
    if not (math.isfinite(cap) and cap > 0):
        raise ValueError(f"rollout correction cap must be a finite number > 0, got {cap}")
    if cap_low is not None and not 0 <= cap_low < cap:
        raise ValueError(f"rollout correction cap_low must be in [0, cap={cap}), got {cap_low}")
    if trainer_logprobs.shape != rollout_logprobs.shape or trainer_logprobs.shape != mask.shape:
        raise ValueError(
            f"trainer_logprobs {tuple(trainer_logprobs.shape)}, rollout_logprobs {tuple(rollout_logprobs.shape)} "
            f"and mask {tuple(mask.shape)} must have the same shape [N, T]"
        )
    keep = mask != 0  # [N, T]
    with torch.no_grad():
        log_w = torch.where(keep, trainer_logprobs.float() - rollout_logprobs.float(), 0.0)  # [N, T]
        abs_mean = masked_mean(log_w.abs(), keep)
        level, how = mode.split("_")
        units = keep  # [N, T] what capped_share counts
        if level == "sequence":
            log_w = log_w.sum(dim=-1, keepdim=True).expand_as(log_w)  # [N, T] log of the product, per row
            units = keep.any(dim=-1)  # [N]
        log_cap = math.log(cap)
        over = log_w > log_cap  # [N, T]
        if how == "mask" and cap_low is not None:
            over = over | (log_w < (math.log(cap_low) if cap_low > 0 else -math.inf))
        weights = torch.exp(log_w.clamp(max=log_cap))  # [N, T] min(w, C), never overflows
        if how == "mask":
            weights = torch.where(over, 0.0, weights)
        weights = torch.where(keep, weights, 0.0)  # [N, T]
        hit = over.any(dim=-1) if level == "sequence" else over  # [N] (a row's columns agree) or [N, T]
        stats = {
            "rollout_correction/log_ratio_abs_mean": abs_mean,
            "rollout_correction/weight_mean": masked_mean(weights, keep),
            "rollout_correction/capped_share": masked_mean(hit.float(), units),
        }
    return weights, stats
