"""MPO: Mixed Preference Optimization (InternVL, arXiv 2411.10442), stage 2 of R1V2.

L = w_p * L_pref (DPO sigmoid) + w_q * L_qual (BCO pair) + w_g * L_gen (SFT on the chosen answer).

Departures from the papers, and why:
- delta (the BCO reward shift, arXiv 2404.04656) is an argument, not hidden state: the caller
  owns a ``RunningMean`` and decides when to update it, so the loss stays a pure function.
  Project convention: delta for step t is ``RunningMean.value`` read BEFORE step t's update,
  so delta never depends on the batch it scores. TRL's ``bco_pair`` (which InternVL's MPO code
  calls) updates first, so its delta includes the current batch; see ``RunningMean``.
- ``RunningMean`` is count-weighted over every reward seen (chosen and rejected), where TRL
  averages per-step batch means; the two agree when every batch has the same size.
- ``loss/pref``, ``loss/qual``, ``loss/gen`` in the stats are the UNWEIGHTED batch means.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def mpo_rewards(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """Implicit rewards beta * (log pi_theta(y|x) - log pi_0(y|x)), each ``[B]``, with grad.

    ``torch.cat(mpo_rewards(...)).detach()`` is what ``RunningMean.update`` takes.
    """
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)  # [B]
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)  # [B]
    return chosen, rejected


def mpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_nll: Tensor,
    beta: float = 0.1,
    delta: float | Tensor = 0.0,
    weights: tuple[float, float, float] = (0.8, 0.2, 1.0),
) -> tuple[Tensor, dict[str, Tensor]]:
    """MPO loss (arXiv 2411.10442; BCO arXiv 2404.04656).

    r_c = beta * (pc - rc), r_r = beta * (pr - rr)
    L_pref = -log sigma(r_c - r_r)
    L_qual = -log sigma(r_c - delta) - log sigma(-(r_r - delta))
    L_gen  = chosen_nll  (= -log pi_theta(y_c|x) / |y_c|)
    L      = mean_batch(w_p * L_pref + w_q * L_qual + w_g * L_gen)

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` policy log-probs summed over
            response tokens.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` same for the frozen reference.
        chosen_nll: ``[B]`` mean token NLL of the chosen response under the policy.
        beta: DPO/BCO temperature.
        delta: BCO reward shift (float or 0-dim tensor, treated as a constant).
        weights: ``(w_p, w_q, w_g)``.

    Returns:
        ``(loss, stats)``; stats are detached 0-dim tensors: ``loss``, ``loss/pref``,
        ``loss/qual``, ``loss/gen``, ``rewards/chosen``, ``rewards/rejected``,
        ``rewards/accuracy`` (share with r_c > r_r), ``rewards/margin`` (mean r_c - r_r),
        ``logps/chosen``, ``logps/rejected``, ``delta``.
    """
    w_pref, w_qual, w_gen = weights
    r_c, r_r = mpo_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )  # [B], [B]
    delta_t = torch.as_tensor(delta, dtype=r_c.dtype, device=r_c.device).detach()
    l_pref = -F.logsigmoid(r_c - r_r)  # [B]
    l_qual = -F.logsigmoid(r_c - delta_t) - F.logsigmoid(-(r_r - delta_t))  # [B]
    l_gen = chosen_nll.to(r_c.dtype)  # [B]
    loss = (w_pref * l_pref + w_qual * l_qual + w_gen * l_gen).mean()
    with torch.no_grad():
        stats = {
            "loss": loss.detach(),
            "loss/pref": l_pref.mean(),
            "loss/qual": l_qual.mean(),
            "loss/gen": l_gen.mean(),
            "rewards/chosen": r_c.mean(),
            "rewards/rejected": r_r.mean(),
            "rewards/accuracy": (r_c > r_r).float().mean(),
            "rewards/margin": (r_c - r_r).mean(),
            "logps/chosen": policy_chosen_logps.mean(),
            "logps/rejected": policy_rejected_logps.mean(),
            "delta": delta_t,
        }
    return loss, {k: v.detach() for k, v in stats.items()}


class RunningMean:
    """The BCO reward shift delta: a running mean of past implicit rewards beta * logratio.

    Each step call ``update(torch.cat([r_c, r_r]).detach())`` with the batch's chosen and
    rejected rewards (``mpo_rewards``), as BCO does. Under DDP, all-gather the rewards first
    so every rank holds the same delta.

    Two modes:
    - ``momentum=None`` (default): mean over ALL values seen so far, count-weighted:
      new_mean = (mean * count + sum(x)) / (count + n).
    - ``momentum=m``: EMA of batch means, mean = m * mean + (1 - m) * mean(x); the first
      update sets mean = mean(x) (NeMo-RL style).

    Timing (project convention): the delta used in step t's loss is ``value`` read BEFORE
    step t's ``update``, so at step 1 delta = 0.0. TRL's ``bco_pair``/``BCOTrainer`` instead
    update first and use the mean that includes the current batch (and average batch means,
    one count per step); ``update`` returns the new value, so ``delta = rm.update(x)``
    reproduces that order.
    """

    def __init__(self, momentum: float | None = None) -> None:
        if momentum is not None and not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1) or None, got {momentum}")
        self.momentum = momentum
        self.mean = 0.0
        self.count = 0

    @property
    def value(self) -> float:
        """Current delta; 0.0 before the first update."""
        return self.mean

    @torch.no_grad()
    def update(self, rewards: Tensor) -> float:
        """Fold a batch of detached rewards (any shape) into the mean; returns the new value."""
        x = rewards.detach().double().flatten()  # [n]
        n = x.numel()
        if n == 0:
            return self.mean
        total = float(x.sum())
        if not math.isfinite(total):
            raise ValueError("RunningMean.update got non-finite rewards")
        if self.momentum is None or self.count == 0:
            self.mean = (self.mean * self.count + total) / (self.count + n)
        else:
            self.mean = self.momentum * self.mean + (1.0 - self.momentum) * total / n
        self.count += n
        return self.mean

    def state_dict(self) -> dict[str, float | int]:
        return {"mean": float(self.mean), "count": int(self.count)}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.mean, self.count = float(state["mean"]), int(state["count"])
