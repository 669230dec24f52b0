"""Shared tensor helpers for the losses: per-token log-probs, entropy, masked means.

Departures from a textbook implementation, and why:
- Log-probs and entropy are computed one batch row at a time in float32, never as a full
  ``log_softmax`` over ``[B, T, V]``: with a 150K vocabulary a float32 copy of the whole
  logits tensor is the largest buffer of a step, a row is B times smaller.
- Labels equal to -100 (or any negative value) are read as index 0; the caller masks them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """log pi(labels[b, t] | ...) = z[labels] - logsumexp(z), in float32.

    Args:
        logits: ``[B, T, V]`` any float dtype (bf16 is upcast row by row).
        labels: ``[B, T]`` int; negative values (-100) are read as 0, mask them yourself.

    Returns:
        ``[B, T]`` float32 log-probabilities; differentiable w.r.t. ``logits``.
    """
    labels = labels.clamp(min=0)  # [B, T]
    rows = []
    for row_logits, row_labels in zip(logits, labels):  # [T, V], [T]
        row_logits = row_logits.float()  # [T, V]
        picked = row_logits.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)  # [T]
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))  # [T]
    if not rows:
        return logits.new_zeros(labels.shape, dtype=torch.float32)
    return torch.stack(rows)  # [B, T]


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the next-token distribution, in nats, float32.

    H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v.

    Logits of ``-inf`` (tokens masked out of the distribution) have p_v = 0 and add nothing.

    Args:
        logits: ``[B, T, V]``.

    Returns:
        ``[B, T]`` float32 entropies.
    """
    rows = []
    for row_logits in logits:  # [T, V]
        row_logits = row_logits.float()  # [T, V]
        probs = torch.softmax(row_logits, dim=-1)  # [T, V]
        weighted = torch.where(probs > 0, probs * row_logits, torch.zeros_like(row_logits))  # [T, V] 0*-inf -> 0
        rows.append(torch.logsumexp(row_logits, dim=-1) - weighted.sum(-1))  # [T]
    if not rows:
        return logits.new_zeros(logits.shape[:-1], dtype=torch.float32)
    return torch.stack(rows)  # [B, T]


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is non-zero (weights if ``mask`` is float).

    Safe on an all-zero mask: the result there is 0, never NaN, and values of ``x`` at masked
    positions (even inf/NaN) never reach the result or its gradient's value.

    Args:
        x: any shape.
        mask: same shape as ``x`` (bool or 0/1).
        dim: reduce over this dim; ``None`` reduces over everything (0-dim result).
    """
    keep = mask != 0
    weights = mask.to(x.dtype) if mask.dtype != torch.bool else keep.to(x.dtype)
    # where() (not x * mask) so that inf/NaN at masked positions cannot leak in as 0 * inf.
    num = torch.where(keep, x * weights, torch.zeros((), dtype=x.dtype, device=x.device))
    if dim is None:
        num, den = num.sum(), weights.sum()
    else:
        num, den = num.sum(dim), weights.sum(dim)
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), 0.0)
