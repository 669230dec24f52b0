"""GRPO: group-normalised advantages and the clipped surrogate loss.

GRPO (DeepSeekMath, arXiv 2402.03300, eq. 3) as used in Skywork R1V2 (arXiv 2504.16656) and
R1V3 (arXiv 2507.06167).

Departures from the papers, and why:
- The group std is the UNBIASED sample std (``torch.std`` default, divisor G - 1), as TRL and
  verl compute it; the papers only write std(r). eps is added to the std, not under a root.
- ``clip_eps_high`` allows the asymmetric "clip-higher" band of DAPO (arXiv 2503.14476); it
  defaults to ``clip_eps`` (the symmetric band of the papers).
- ``aggregation="token"`` (DAPO-style token mean) is offered beside the paper's per-sequence
  mean ``"sequence"`` (the default), and ``"token_sum_norm"``: each sequence's token sum divided by
  a constant L (the engine's ``max_new_tokens``), then the mean over sequences (Dr. GRPO,
  arXiv 2503.20783, sec. 3.2; verl's ``seq-mean-token-sum-norm``, TRL's ``dr_grpo``).
- ``importance_level="sequence"`` is GSPO (arXiv 2507.18071, eq. 7): one ratio per sequence,
  the geometric mean of its token ratios, clipped per sequence.
- ``token_weights`` multiply the clipped surrogate per token (rollout-correction weights,
  ``losses/correction.py``; the high-entropy mask, ``losses/high_entropy.py``); the KL term and
  the denominators are left as they are.
- The KL term, when used, is the k3 estimator (Schulman, http://joschu.net/blog/kl-approx.html)
  added per token, as in DeepSeekMath eq. 4; R1V3 runs with coefficient 0.
- Log-ratios at masked (padding) positions are set to 0 before ``exp`` so that garbage there
  can never overflow into inf/NaN gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_r1v2.losses.common import masked_mean

AGGREGATIONS = ("sequence", "token", "token_sum_norm")
IMPORTANCE_LEVELS = ("token", "sequence")


def group_advantages(
    rewards: Tensor, group_size: int, scale: bool = True, eps: float = 1e-6
) -> Tensor:
    """A_i = (r_i - mean(r_group)) / (std(r_group) + eps), broadcast later to every token.

    std is the UNBIASED sample std (divisor G - 1, ``torch.std`` default, as TRL/verl).
    A group whose rewards are all equal gets A = 0; a group of size 1 gets A = 0.

    Args:
        rewards: ``[N]`` with N = B * G, the G responses of one prompt contiguous.
        group_size: G.
        scale: divide by (std + eps); ``False`` returns r - mean (Dr. GRPO, arXiv 2503.20783).
        eps: added to the std.

    Returns:
        ``[N]`` float32 advantages.

    Raises:
        ValueError: if rewards is not 1-D, N % G != 0, G < 1, or a reward is NaN/inf.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"group_size={group_size} must be >= 1 and divide the number of rewards "
            f"N={rewards.numel()} (rows of a group contiguous, N = B * G)"
        )
    if not torch.isfinite(rewards).all():
        raise ValueError(f"rewards must be finite, got {rewards.tolist()}")
    grouped = rewards.float().view(-1, group_size)  # [B, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # [B, G]
    if scale and group_size > 1:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)  # [B, G]
    return centred.reshape(-1)  # [N]


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref): exp(d) - d - 1, d = ref - logp.

    Non-negative, unbiased for sampled tokens (DeepSeekMath eq. 4). Shapes: ``[N, T]`` in and out.
    """
    d = ref_logprobs - logprobs  # [N, T]
    return torch.exp(d) - d - 1.0  # [N, T]


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    aggregation: str = "sequence",
    importance_level: str = "token",
    token_weights: Tensor | None = None,
    length_norm: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate of R1V2 (arXiv 2504.16656), DeepSeekMath (arXiv 2402.03300) eq. 3:

    L = -(1/G) sum_i (1/|y_i|) sum_t [ w_t min(rho_t A_i, clip(rho_t, 1-eps_lo, 1+eps_hi) A_i)
                                       - kl_coef * KL_k3,t ],   rho_t = exp(logp_t - old_logp_t),

    w_t = ``token_weights`` (1 when None). GSPO (``importance_level="sequence"``, arXiv 2507.18071
    eq. 7) replaces rho_t of every token of sequence i by

        s_i = exp( (1/|y_i|) sum_t (logp_t - old_logp_t) ),

    so the min and the clip act once per sequence; d s_i / d logp_t = s_i / |y_i|.

    Args:
        logprobs: ``[N, T]`` current policy log-probs of the sampled tokens (with grad).
        old_logprobs: ``[N, T]`` behaviour policy log-probs (no grad; equal to ``logprobs``
            detached when fully on-policy, then rho = 1).
        advantages: ``[N]`` sequence-level advantages.
        mask: ``[N, T]`` 1 on response tokens.
        clip_eps: lower band half-width eps_lo (and the upper one if ``clip_eps_high`` is None).
        clip_eps_high: upper band half-width eps_hi.
        ref_logprobs: ``[N, T]`` reference log-probs; needed if ``kl_coef`` != 0.
        kl_coef: weight of the k3 KL term.
        aggregation: ``"sequence"`` mean per sequence then over sequences with >= 1 token;
            ``"token"`` sum over all masked tokens / their count; ``"token_sum_norm"`` per-sequence
            sum / ``length_norm``, then the mean over sequences with >= 1 token (Dr. GRPO).
        importance_level: ``"token"`` (rho_t) or ``"sequence"`` (GSPO's s_i).
        token_weights: ``[N, T]`` detached per-token weights w_t of the surrogate, or None.
        length_norm: the constant L of ``"token_sum_norm"`` (the longest completion the engine
            may sample, ``max_new_tokens``).

    Returns:
        ``(loss, stats)``: stats (detached 0-dim) are ``loss``, ``clip_fraction``
        (= low + high), ``clip_ratio/low_mean`` (share of masked tokens with rho < 1-eps_lo and
        A < 0), ``clip_ratio/high_mean`` (rho > 1+eps_hi and A > 0), ``kl`` (mean k3 over
        masked tokens; 0 without a reference), ``ratio_mean``.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if importance_level not in IMPORTANCE_LEVELS:
        raise ValueError(f"importance_level must be one of {IMPORTANCE_LEVELS}, got {importance_level!r}")
    if aggregation == "token_sum_norm" and (length_norm is None or length_norm < 1):
        raise ValueError(f"aggregation='token_sum_norm' needs length_norm >= 1 (max_new_tokens), got {length_norm}")
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs")
    keep = mask != 0  # [N, T]
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = torch.where(keep, logprobs - old_logprobs, 0.0)  # [N, T]
    if importance_level == "sequence":  # GSPO: the mean log-ratio of the sequence, on each of its tokens
        log_ratio = masked_mean(log_ratio, keep, dim=-1).unsqueeze(-1).expand_as(log_ratio)  # [N, T]
    ratio = torch.exp(log_ratio)  # [N, T]
    adv = advantages.to(ratio.dtype).unsqueeze(-1)  # [N, 1]
    unclipped = ratio * adv  # [N, T]
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + high) * adv  # [N, T]
    per_token = -torch.minimum(unclipped, clipped)  # [N, T]
    if token_weights is not None:
        per_token = per_token * token_weights.detach().to(per_token.dtype)  # [N, T]

    kl = torch.zeros((), device=logprobs.device)
    if ref_logprobs is not None:
        kl_tok = k3_kl(logprobs, torch.where(keep, ref_logprobs, logprobs))  # [N, T]
        kl = masked_mean(kl_tok, mask).detach()
        if kl_coef != 0.0:
            per_token = per_token + kl_coef * kl_tok  # [N, T]

    if aggregation == "sequence":
        per_seq = masked_mean(per_token, mask, dim=-1)  # [N]
        loss = masked_mean(per_seq, keep.any(dim=-1))
    elif aggregation == "token_sum_norm":
        per_seq = torch.where(keep, per_token, 0.0).sum(dim=-1) / length_norm  # [N]
        loss = masked_mean(per_seq, keep.any(dim=-1))
    else:
        loss = masked_mean(per_token, mask)

    with torch.no_grad():
        low_hit = (ratio < 1.0 - clip_eps) & (adv < 0)  # [N, T]
        high_hit = (ratio > 1.0 + high) & (adv > 0)  # [N, T]
        low_frac = masked_mean(low_hit.float(), keep)
        high_frac = masked_mean(high_hit.float(), keep)
        stats = {
            "loss": loss.detach(),
            "clip_fraction": low_frac + high_frac,
            "clip_ratio/low_mean": low_frac,
            "clip_ratio/high_mean": high_frac,
            "kl": kl,
            "ratio_mean": masked_mean(ratio, keep),
        }
    return loss, stats


def micro_batch_weights(mask: Tensor, sizes: list[int], aggregation: str = "sequence") -> list[float]:
    """Weights w_k of the micro-batches of one mini-batch, so that sum_k w_k L_k = L.

    ``grpo_loss`` averages, so the loss of a mini-batch split into consecutive micro-batches
    (gradient accumulation) is the weighted sum of the micro-batch losses, with weights the
    micro-batch's share of what the mean runs over:

        "sequence", "token_sum_norm": w_k = S_k / S, S_k = sequences of micro-batch k with >= 1 response token;
        "token":    w_k = T_k / T, T_k = response tokens of micro-batch k.

    A micro-batch with nothing to average gets w_k = 0 (its loss is 0 too); so does every one
    when the mini-batch has none.

    Args:
        mask: ``[n, T]`` response mask of the mini-batch (dropped rows already zeroed).
        sizes: rows of each consecutive micro-batch, summing to n.
        aggregation: as in ``grpo_loss``.

    Example: rows with 3, 0 and 1 tokens split [2, 1]: sequence -> [1/2, 1/2]; token -> [3/4, 1/4].
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if sum(sizes) != mask.shape[0] or any(s < 1 for s in sizes):
        raise ValueError(f"micro-batch sizes {sizes} must be >= 1 and sum to the {mask.shape[0]} rows")
    keep = mask != 0  # [n, T]
    units = keep.sum(dim=-1).float() if aggregation == "token" else keep.any(dim=-1).float()  # [n]
    parts = [float(p.sum()) for p in units.split(sizes)]
    total = sum(parts)
    return [p / total if total > 0 else 0.0 for p in parts]
