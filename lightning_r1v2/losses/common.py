"""Shared tensor helpers for the losses: per-token log-probs, entropy, masked means.

Departures from a textbook implementation, and why:
- Log-probs and entropy are computed in float32 over chunks of rows of at most
  ``CHUNK_ELEMENTS`` logits, never as a full ``log_softmax`` over a large ``[B, T, V]``: with a
  150K vocabulary a float32 copy of the whole logits tensor is the largest buffer of a step.
- Labels equal to -100 (or any negative value) are read as index 0; the caller masks them.
"""

from __future__ import annotations

import torch
from torch import Tensor


CHUNK_ELEMENTS = 1 << 24  # float32 elements per chunk of rows: 64 MB


def _row_chunks(logits: Tensor, max_elements: int) -> list[slice]:
    """Consecutive row ranges of ``[B, T, V]`` logits holding at most ``max_elements`` each (>= 1 row)."""
    B = logits.shape[0]
    per_row = max(1, logits[0].numel()) if B else 1
    step = max(1, max_elements // per_row)
    return [slice(i, min(i + step, B)) for i in range(0, B, step)]


def token_logprobs(logits: Tensor, labels: Tensor, max_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """log pi(labels[b, t] | ...) = z[labels] - logsumexp(z), in float32.

    Computed over chunks of rows of at most ``max_elements`` logits, never as one float32 copy
    of a large ``[B, T, V]`` (with a 150K vocabulary that copy would be the largest buffer of a
    step); small batches are one chunk, with no Python loop over samples.

    Args:
        logits: ``[B, T, V]`` any float dtype (bf16 is upcast chunk by chunk).
        labels: ``[B, T]`` int; negative values (-100) are read as 0, mask them yourself.
        max_elements: logits per chunk.

    Returns:
        ``[B, T]`` float32 log-probabilities; differentiable w.r.t. ``logits``.
    """
    labels = labels.clamp(min=0)  # [B, T]
    if logits.shape[0] == 0:
        return logits.new_zeros(labels.shape, dtype=torch.float32)
    parts = []
    for rows in _row_chunks(logits, max_elements):
        z = logits[rows].float()  # [b, T, V]
        picked = z.gather(-1, labels[rows].unsqueeze(-1)).squeeze(-1)  # [b, T]
        parts.append(picked - torch.logsumexp(z, dim=-1))  # [b, T]
    return torch.cat(parts)  # [B, T]


def entropy_from_logits(logits: Tensor, max_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """Entropy of the next-token distribution, in nats, float32.

    H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v.

    Logits of ``-inf`` (tokens masked out of the distribution) have p_v = 0 and add nothing.
    Computed over chunks of rows of at most ``max_elements`` logits, as ``token_logprobs``.

    Args:
        logits: ``[B, T, V]``.
        max_elements: logits per chunk.

    Returns:
        ``[B, T]`` float32 entropies.
    """
    if logits.shape[0] == 0:
        return logits.new_zeros(logits.shape[:-1], dtype=torch.float32)
    parts = []
    for rows in _row_chunks(logits, max_elements):
        z = logits[rows].float()  # [b, T, V]
        probs = torch.softmax(z, dim=-1)  # [b, T, V]
        weighted = torch.where(probs > 0, probs * z, torch.zeros_like(z))  # [b, T, V] 0*-inf -> 0
        parts.append(torch.logsumexp(z, dim=-1) - weighted.sum(-1))  # [b, T]
    return torch.cat(parts)  # [B, T]


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
