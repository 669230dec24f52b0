"""DAPO's dynamic sampling (arXiv 2503.14476, sec. 3.2): online filtering of zero-variance groups.

A group whose G rewards are all equal has every advantage 0 and gives no gradient. DAPO
over-samples and keeps only groups with a reward spread (its eq. 11 constraint):

    0 < |{o_i : is_equivalent(a, o_i)}| < G,

sampling more prompts until the batch holds B such groups. This callback does that in
``on_advantages``, before the Selective Sample Buffer if both are listed (put it first): while the
batch holds fewer than ``ceil(min_share * B)`` groups with spread, it draws more prompts (as many as
groups are missing, or ``round_prompts``), has the module sample and score them (``GRPOModule.score_rollouts``), and keeps their
groups with spread; at most ``max_extra_prompts`` extra prompts (``x G`` extra rollouts) per step.
The batch it returns has the step's B groups: those with spread first (this batch's, then the
extra ones, in order), then, only when the cap stopped it short, zero-variance groups of the
step's own batch, so that every rank keeps the same batch size.

Departures from DAPO / verl's ``filter_groups``, and why:
- The spread is that of the combined reward (the advantages' input), std > ``eps`` (TRL's
  ``frac_reward_zero_std`` uses the same test); a group with a dropped row (reward fault,
  ``on_error: drop_group``) counts as having none.
- Extra prompts are drawn from the training records by the callback's own seeded stream (a
  permutation per pass, rank r seeded ``seed + r``), not taken from the next batches: the
  epoch's data order and the resume of the data loader stay as they are, and the stream's
  position is saved in the checkpoint. A prompt can thus be seen twice in an epoch.
- Hitting the cap is not an error (verl raises once ``max_num_gen_batches`` is reached): the rest
  of the batch is filled as said above, and ``dynamic_sampling/zero_std_share_after`` shows it.
- Extra rollouts skip ``on_rollouts`` / ``on_rewards`` (monitors count the step's own batch once),
  and the reward callbacks' logged stats stay those of the step's own batch.
- With several ranks the rounds run in lockstep (a round happens on every rank while any rank is
  short: generation under ZeRO-3 is collective).

Logged (``last_stats``): ``dynamic_sampling/extra_rollouts`` (this step), ``extra_rollouts_total``
(the run), ``rounds``, ``zero_std_share_before`` (share of the step's own groups without spread),
``zero_std_share_after`` (share in the returned batch: 0 unless the cap was hit), ``time`` (s).
"""
from __future__ import annotations

import math
import time

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from lightning_r1v2.callbacks.hooks import RolloutHooks
from lightning_r1v2.data.collate import PromptCollator
from lightning_r1v2.rollout.types import Rollouts
from lightning_r1v2.utils.distributed import world_and_rank

__all__ = ["DynamicSampling", "groups_with_spread"]


def groups_with_spread(reward: torch.Tensor, group_ids: torch.Tensor, dropped: torch.Tensor | None,
                       eps: float = 1e-6) -> tuple[list[int], list[bool], list[torch.Tensor]]:
    """The groups of a batch in order of first appearance, whether each has a reward spread
    (std > ``eps`` and no dropped row), and each group's row indices.

    Example: rewards [1, 1, 0, 1] in groups [0, 0, 1, 1] -> ids [0, 1], spread [False, True].
    """
    ids, spread, rows = [], [], []
    gids = group_ids.detach().cpu()
    r = reward.detach().float().cpu()
    drop = dropped.detach().cpu().bool() if dropped is not None else torch.zeros(len(gids), dtype=torch.bool)  # on CPU: group bookkeeping
    for g in dict.fromkeys(gids.tolist()):  # first-appearance order
        idx = (gids == g).nonzero().flatten()
        ids.append(g)
        rows.append(idx)
        vals = r[idx]
        spread.append(bool(idx.numel() > 1 and vals.std() > eps and not drop[idx].any()))
    return ids, spread, rows


class DynamicSampling(RolloutHooks):
    """Refill the step's batch with groups that have a reward spread (DAPO's dynamic sampling).

    Args:
        min_share: Share of the step's B groups that must have a spread before sampling stops
            (1.0: all of them, as DAPO).
        max_extra_prompts: Most extra prompts sampled per step (each costs ``group_size`` rollouts).
        round_prompts: Prompts per extra round (0: as many as groups are still missing; DAPO and
            verl sample a whole batch, B, each round).
        eps: A group's reward std at or below this counts as zero.
        seed: Seed of the extra-prompt stream (rank r uses seed + r).
    """

    def __init__(self, min_share: float = 1.0, max_extra_prompts: int = 64, round_prompts: int = 0,
                 eps: float = 1e-6, seed: int = 0):
        super().__init__()
        if not 0 < min_share <= 1:
            raise ValueError(f"min_share must be in (0, 1], got {min_share}")
        if max_extra_prompts < 0 or round_prompts < 0:
            raise ValueError(f"max_extra_prompts and round_prompts must be >= 0, got {max_extra_prompts}, {round_prompts}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.min_share, self.max_extra_prompts, self.round_prompts = float(min_share), int(max_extra_prompts), int(round_prompts)
        self.eps, self.seed = float(eps), int(seed)
        self.extra_rollouts_total = 0
        self._pass, self._pos = 0, 0  # extra-prompt stream: permutation number and position in it
        self.last_stats: dict[str, float] = {}

    def on_advantages(self, trainer, pl_module, rollouts: Rollouts) -> Rollouts | None:
        """Sample extra prompts until enough groups have a spread; return B groups, spread first."""
        t0 = time.perf_counter()
        G = rollouts.group_size
        ids, spread, rows = groups_with_spread(rollouts.reward, rollouts.group_ids, rollouts.dropped, self.eps)
        B = len(ids)
        need = math.ceil(self.min_share * B - 1e-9)
        parts, keep = [rollouts], [(0, r) for r, s in zip(rows, spread) if s]  # (part, rows) with spread
        next_id = int(rollouts.group_ids.max()) + 1 if len(rollouts) else 0
        extra = rounds = 0
        while extra < self.max_extra_prompts and self._any_rank(len(keep) < need, pl_module.device):
            k = min(self.round_prompts or max(need - len(keep), 1), self.max_extra_prompts - extra)
            more = self._sample(trainer, pl_module, k, G)
            more.group_ids = more.group_ids + next_id
            next_id = int(more.group_ids.max()) + 1
            _, more_spread, more_rows = groups_with_spread(more.reward, more.group_ids, more.dropped, self.eps)
            parts.append(more)
            keep += [(len(parts) - 1, r) for r, s in zip(more_rows, more_spread) if s]
            extra, rounds = extra + k, rounds + 1
        chosen = keep[:B]
        chosen += [(0, r) for r, s in zip(rows, spread) if not s][: B - len(chosen)]  # only when short
        out = self._assemble(parts, chosen, pl_module)
        self.extra_rollouts_total += extra * G
        self.last_stats = {
            "dynamic_sampling/extra_rollouts": float(extra * G),
            "dynamic_sampling/extra_rollouts_total": float(self.extra_rollouts_total),
            "dynamic_sampling/rounds": float(rounds),
            "dynamic_sampling/zero_std_share_before": 1.0 - sum(spread) / max(B, 1),
            "dynamic_sampling/zero_std_share_after": 1.0 - min(len(keep), B) / max(B, 1),
            "dynamic_sampling/time": time.perf_counter() - t0,
        }
        return out

    # -- checkpointing ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"pass": self._pass, "pos": self._pos, "extra_rollouts_total": self.extra_rollouts_total}

    def load_state_dict(self, state_dict: dict) -> None:
        self._pass, self._pos = int(state_dict["pass"]), int(state_dict["pos"])
        self.extra_rollouts_total = int(state_dict["extra_rollouts_total"])

    # -- internals ----------------------------------------------------------------------------------

    def _records(self, trainer) -> list[dict]:
        records = getattr(getattr(trainer, "datamodule", None), "train_records", None)
        if not records:
            records = getattr(getattr(getattr(trainer, "train_dataloader", None), "dataset", None), "records", None)
        if not records:
            raise ValueError("DynamicSampling draws its extra prompts from the training records: it needs "
                             "R1V2DataModule (or a train dataloader whose dataset has .records)")
        return records

    def _draw(self, trainer, k: int) -> list[dict]:
        """The next ``k`` records of the stream: permutation ``randperm(n, seed + rank + 7919 * pass)``."""
        records = self._records(trainer)
        n, (_, rank) = len(records), world_and_rank()
        out = []
        while len(out) < k:
            if self._pos >= n:
                self._pass, self._pos = self._pass + 1, 0
            g = torch.Generator().manual_seed(self.seed + rank + 7919 * self._pass)
            order = torch.randperm(n, generator=g).tolist()  # on CPU: record indices
            take = order[self._pos: self._pos + k - len(out)]
            out += [records[i] for i in take]
            self._pos += len(take)
        return out

    def _sample(self, trainer, pl_module, k: int, G: int) -> Rollouts:
        """``k`` fresh prompts x ``G``, sampled and scored by the module (reward stats left as they were)."""
        batch = PromptCollator(pl_module.processor)(self._draw(trainer, k))
        batch = move_data_to_device(batch, pl_module.device)
        more = pl_module.engine.generate(pl_module.policy(), batch, G)
        saved = [(cb, dict(cb.last_stats)) for cb in pl_module.reward_callbacks() if hasattr(cb, "last_stats")]
        more = pl_module.score_rollouts(more, hooks=False)
        for cb, stats in saved:
            cb.last_stats = stats
        pl_module.add_reference_logprobs(more)
        return more

    @staticmethod
    def _assemble(parts: list[Rollouts], chosen: list[tuple[int, torch.Tensor]], pl_module) -> Rollouts:
        """The chosen groups' rows, one ``Rollouts``; optional per-row flags filled where a part lacks them."""
        pieces = [parts[p].select(r) for p, r in chosen]
        for name in ("dropped", "truncated"):
            if any(getattr(x, name) is not None for x in pieces):
                for x in pieces:
                    if getattr(x, name) is None:
                        setattr(x, name, torch.zeros(len(x), dtype=torch.bool, device=x.completion_ids.device))
        pad = getattr(getattr(pl_module, "tokenizer", None), "pad_token_id", None) or 0
        return Rollouts.concat(pieces, pad_token_id=int(pad))

    @staticmethod
    def _any_rank(flag: bool, device) -> bool:
        """``flag`` OR-ed over the ranks (collective when there are several)."""
        world, _ = world_and_rank()
        if world == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([int(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())
