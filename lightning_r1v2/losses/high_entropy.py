"""High-entropy tokens only: the policy gradient of "Beyond the 80/20 rule" (Wang et al., arXiv 2506.01939).

Only the top rho share of a batch's response tokens by entropy ("forking tokens") carry the
policy gradient (paper eq. 6, DAPO's token-mean objective with an indicator):

    J = E_B [ 1 / sum_i |o_i| * sum_i sum_t 1[H_{i,t} >= tau_rho^B] * min(r_{i,t} A_{i,t}, clip(r_{i,t}) A_{i,t}) ],

where tau_rho^B is the (1 - rho) quantile of the entropies H of every response token of the batch B
(the paper's rho = 0.2: the top 20%).

Departures, and why:
- The quantile is linearly interpolated between order statistics (``torch.quantile``'s default,
  as TRL's ``top_entropy_quantile``); tokens tied at the threshold are all kept.
- "The batch" is what one loss call sees (a micro-batch under gradient accumulation, as TRL's
  per-device batch); with ``micro_batch_size`` 0 it is the whole mini-batch.
- The mask multiplies the per-token loss; the denominator stays every response token (the
  indicator sits inside the sum in eq. 6), so the loss is not renormalised to the kept share.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def high_entropy_mask(entropy: Tensor, mask: Tensor, top_share: float) -> tuple[Tensor, Tensor]:
    """1 on the response tokens whose entropy is in the top ``top_share`` of the batch, else 0.

    tau = the (1 - top_share) quantile of ``entropy[mask]`` (linear interpolation: position
    p = (1 - top_share) * (M - 1) in the sorted M values, tau = v[floor p] + frac(p) * (v[ceil p] -
    v[floor p])); a token is kept when H >= tau.

    Args:
        entropy: ``[N, T]`` per-token entropies (nats; no grad needed).
        mask: ``[N, T]`` 1 on response tokens.
        top_share: rho in (0, 1]; 1.0 keeps every response token.

    Returns:
        ``(keep, tau)``: keep ``[N, T]`` float 0/1 (0 at padding), tau the 0-dim threshold
        (``-inf`` when the batch has no response token).

    Example: entropies [0.1, 0.5, 0.9, 1.3, 2.0], top_share 0.4: p = 0.6 * 4 = 2.4,
    tau = 0.9 + 0.4 * (1.3 - 0.9) = 1.06 -> keep [0, 0, 0, 1, 1].
    """
    if not (isinstance(top_share, (int, float)) and math.isfinite(top_share) and 0 < top_share <= 1):
        raise ValueError(f"entropy top share (entropy_quantile) must be in (0, 1], got {top_share!r}")
    if entropy.shape != mask.shape:
        raise ValueError(f"entropy {tuple(entropy.shape)} and mask {tuple(mask.shape)} must have the same shape [N, T]")
    keep = mask != 0  # [N, T]
    values = entropy.detach().float()[keep].sort().values  # [M]
    if values.numel() == 0:
        return torch.zeros_like(entropy, dtype=torch.float32), torch.tensor(-math.inf, device=entropy.device)
    pos = (1.0 - top_share) * (values.numel() - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    tau = values[lo] + (pos - lo) * (values[hi] - values[lo])  # 0-dim
    return ((entropy.detach().float() >= tau) & keep).float(), tau  # [N, T]
