"""Combine reward columns into the one scalar reward per completion that GRPO normalises."""
from __future__ import annotations

import torch

__all__ = ["combine_rewards", "score_columns", "combine_columns", "score_and_combine", "MODES"]

MODES = ("sum", "weighted", "gate")


def combine_rewards(
    columns: dict[str, torch.Tensor],
    weights: dict[str, float] | None = None,
    mode: str = "weighted",
    groups: dict[str, str] | None = None,
) -> torch.Tensor:
    """One reward per row from named reward columns; NaN (not applicable) contributes 0.

    Columns are ``[N]`` float tensors (``rollouts.rewards``). A weight missing from ``weights``
    is 1.0. With ``c_k`` a column, ``w_k`` its weight and NaN read as 0 (TRL's ``nansum``):

    - ``sum``      (R1V2: r = r_rule + r_rm + r_format):   r = sum_k c_k
    - ``weighted`` (R1V3: r = 0.8 r_acc + 0.2 r_format):    r = sum_k w_k c_k
    - ``gate``     (R1V3's accuracy: rule verifier OR model verifier): columns that share a group
      name (``groups[name]``, default the column's own name) are OR-ed as their max over the
      applicable ones, then r = sum_g w_g max_{k in g} c_k, with w_g the weight of the group's
      first column (in ``columns`` order). A group where no member applies contributes 0.

    Worked example (gate), rows = 2, groups {rule: acc, model: acc}, weights {rule: 0.8, format: 0.2}:
        rule = [1, 0], model = [0, NaN], format = [1, 1]
        acc = max(rule, model) = [1, 0];  r = 0.8 * [1, 0] + 0.2 * [1, 1] = [1.0, 0.2]

    Returns:
        ``[N]`` float32.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not columns:
        raise ValueError("no reward columns to combine")
    weights = weights or {}
    names = list(columns)
    n = columns[names[0]].shape[0]
    for k, v in columns.items():
        if v.shape != (n,):
            raise ValueError(f"reward column {k!r} has shape {tuple(v.shape)}, expected ({n},)")
    cols = {k: v.detach().float() for k, v in columns.items()}
    total = torch.zeros(n, dtype=torch.float32, device=cols[names[0]].device)  # [N]
    if mode == "sum":
        for k in names:
            total += torch.nan_to_num(cols[k], nan=0.0)
        return total
    if mode == "weighted":
        for k in names:
            total += float(weights.get(k, 1.0)) * torch.nan_to_num(cols[k], nan=0.0)
        return total
    groups = groups or {}
    members: dict[str, list[str]] = {}
    for k in names:
        members.setdefault(groups.get(k, k), []).append(k)
    for ks in members.values():
        stacked = torch.stack([cols[k] for k in ks])  # [K, N]
        best = stacked.masked_fill(stacked.isnan(), -torch.inf).amax(0)  # [N]
        best = torch.where(stacked.isnan().all(0), torch.zeros_like(best), best)
        total += float(weights.get(ks[0], 1.0)) * best
    return total


def score_columns(rollouts, callbacks: list) -> None:
    """Each reward callback's column into ``rollouts.rewards[name]``, in order; rows a callback asks
    to drop (its ``last_dropped``, ``[N]`` bool, e.g. the groups of faulty rows) leave the loss."""
    for cb in callbacks:
        rollouts.rewards[cb.name] = cb.score(rollouts)
        drop = getattr(cb, "last_dropped", None)
        if drop is not None:
            drop = drop.to(rollouts.group_ids.device)
            rollouts.dropped = drop if rollouts.dropped is None else rollouts.dropped | drop


def combine_columns(rollouts, callbacks: list, mode: str = "weighted") -> torch.Tensor:
    """``combine_rewards`` of the columns with the callbacks' current weights and groups."""
    return combine_rewards(
        rollouts.rewards,
        {cb.name: cb.weight for cb in callbacks},
        mode=mode,
        groups={cb.name: cb.group for cb in callbacks if getattr(cb, "group", None)},
    )


def score_and_combine(rollouts, callbacks: list, mode: str = "weighted") -> torch.Tensor:
    """Score with every reward callback, then combine: the combined reward ``[N]``."""
    score_columns(rollouts, callbacks)
    return combine_columns(rollouts, callbacks, mode)
