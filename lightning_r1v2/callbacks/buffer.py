"""The Selective Sample Buffer (SSB) of Skywork R1V2 (arXiv 2504.16656), after VL-Rethinker's
Selective Sample Replay (arXiv 2504.08837).

A group whose responses all get the same reward has zero advantages and gives no gradient. The
buffer keeps the rows that carried a signal (|A| > eps) and, at later steps, replays them in place
of zero-advantage rows, drawing buffered row j with P(j) = |A_j|^alpha / sum_k |A_k|^alpha.
Replayed rows keep their stored advantages and old log-probs (the clipped ratio sees their
staleness), get ``from_buffer = True`` and group ids of their own. The buffer is per rank.

Departures from the papers (which publish neither buffer size, alpha nor re-injection ratio), and
the distributed and checkpoint details: docs/components.md, "The Selective Sample Buffer".
"""
from __future__ import annotations

import math
from dataclasses import fields, replace

import logging

import torch
from torch import Tensor

from lightning_r1v2.callbacks.hooks import RolloutHooks
from lightning_r1v2.rollout.types import Rollouts
from lightning_r1v2.utils.distributed import all_ranks, world_and_rank

log = logging.getLogger("lightning_r1v2.buffer")

__all__ = ["buffer_sample_probs", "draw_from_buffer", "SelectiveSampleBuffer"]


def buffer_sample_probs(abs_adv: Tensor, alpha: float) -> Tensor:
    """P(j) = |A_j|^alpha / sum_k |A_k|^alpha, the buffer's sampling distribution.

    Computed as (|A_j| / max|A|)^alpha normalised, which is the same value without overflow.
    alpha = 0 gives the uniform distribution; larger alpha favours large |A|.

    Args:
        abs_adv: ``[M]`` absolute advantages of the buffered samples (>= 0).
        alpha: exponent (>= 0).

    Returns:
        ``[M]`` probabilities summing to 1 (float dtype of the input, float32 for integer input).

    Raises:
        ValueError: if abs_adv is empty, not 1-D, holds a negative or non-finite value, if alpha is
            negative or not finite, or if every |A| is 0 with alpha > 0.

    Example:
        |A| = [1, 3]: alpha 1 -> [1/4, 3/4]; alpha 2 -> [1/10, 9/10]; alpha 0 -> [1/2, 1/2].

        >>> buffer_sample_probs(torch.tensor([1.0, 3.0]), 2.0)
        tensor([0.1000, 0.9000])
    """
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    if abs_adv.dim() != 1 or abs_adv.numel() == 0:
        raise ValueError(f"abs_adv must be a non-empty 1-D tensor, got shape {tuple(abs_adv.shape)}")
    a = abs_adv.detach().double()
    if not torch.isfinite(a).all() or (a < 0).any():
        raise ValueError(f"abs_adv must be finite and >= 0, got {abs_adv.tolist()}")
    dtype = abs_adv.dtype if abs_adv.is_floating_point() else torch.float32
    if alpha == 0:
        return torch.full_like(a, 1.0 / a.numel()).to(dtype)
    top = a.max()
    if top == 0:
        raise ValueError("every |A| in the buffer is 0: nothing to draw with alpha > 0")
    w = (a / top).pow(alpha)  # [M] in [0, 1], the largest is 1
    return (w / w.sum()).to(dtype)


def draw_from_buffer(
    abs_adv: Tensor, n: int, alpha: float, generator: torch.Generator, replacement: bool = True
) -> Tensor:
    """``n`` indices into the buffer drawn by ``buffer_sample_probs(abs_adv, alpha)``.

    Args:
        abs_adv: ``[M]`` absolute advantages of the buffered samples.
        n: number of draws (>= 0).
        alpha: exponent of P(j) = |A_j|^alpha / sum_k |A_k|^alpha.
        generator: the torch.Generator (CPU) to draw with; same state, same draws.
        replacement: draw with replacement (default); without needs n <= number of P(j) > 0.

    Returns:
        ``[n]`` long indices (CPU).

    Example:
        With |A| = [1, 3] and alpha 1, about a quarter of many draws are 0 and the rest 1.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    probs = buffer_sample_probs(abs_adv, alpha).double().cpu()  # [M]
    if n == 0:
        return torch.empty(0, dtype=torch.long)  # on CPU: buffer bookkeeping
    return torch.multinomial(probs, n, replacement=replacement, generator=generator)


_SEQ = ("old_logprobs", "ref_logprobs")  # must exist on replayed rows if the batch has them


class SelectiveSampleBuffer(RolloutHooks):
    """Replay effective samples (|A| > eps) from earlier steps in place of zero-advantage rows.

    Runs in ``on_advantages``; after it ``self.last_stats`` holds (the module logs them):
    ``ssb/effective_share_before``, ``ssb/effective_share_after`` (share of rows with |A| > eps and
    not dropped), ``ssb/buffer_size`` (after storing this step's rows), ``ssb/replayed_share``
    (share of the returned batch drawn from the buffer), ``ssb/evicted_age`` and
    ``ssb/evicted_capacity`` (rows pushed out this step).

    The returned batch is the kept rows of this batch in their order, then the replayed rows.
    """

    def __init__(
        self,
        capacity: int = 512,
        alpha: float = 1.0,
        refill_share: float = 1.0,
        max_age: int = 8,
        eps: float = 1e-6,
        seed: int = 0,
        pad_token_id: int = 0,
        clear_every_epoch: bool = False,
    ):
        """
        Args:
            capacity: Most samples kept in the buffer; the oldest are evicted first.
            alpha: Exponent of P(j) = |A_j|^alpha / sum_k |A_k|^alpha (0: uniform).
            refill_share: Share of the batch's zero-advantage rows replaced by buffered samples
                (1.0: all of them, 0.0: none; the buffer still fills).
            max_age: A buffered sample older than this many steps is dropped (0: no limit).
            eps: |A| <= eps counts as a zero advantage.
            seed: Seed of the draws (rank r of a distributed run uses seed + r).
            pad_token_id: Padding id used when re-padding rows of different lengths; the module's
                ``tokenizer.pad_token_id`` wins when the module has a tokenizer.
            clear_every_epoch: Empty the buffer at the end of every training epoch.
        """
        super().__init__()
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
        if not 0.0 <= refill_share <= 1.0:
            raise ValueError(f"refill_share must be in [0, 1], got {refill_share}")
        if max_age < 0:
            raise ValueError(f"max_age must be >= 0 (0: no limit), got {max_age}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.capacity, self.alpha, self.refill_share = int(capacity), float(alpha), float(refill_share)
        self.max_age, self.eps, self.seed = int(max_age), float(eps), int(seed)
        self.pad_token_id, self.clear_every_epoch = int(pad_token_id), bool(clear_every_epoch)
        self.generator = torch.Generator().manual_seed(self.seed)
        self._store: Rollouts | None = None  # buffered rows, CPU
        self._steps = torch.empty(0, dtype=torch.long)  # on CPU: buffer bookkeeping; [M] step at which each row was stored
        self._calls = 0  # hook calls: the step when no trainer is given
        self._rank_seeded = False
        self.last_stats: dict[str, float] = {}

    def __len__(self) -> int:
        return 0 if self._store is None else len(self._store)

    def clear(self) -> None:
        """Empty the buffer (the generator state is kept)."""
        self._store, self._steps = None, torch.empty(0, dtype=torch.long)  # on CPU: buffer bookkeeping

    # -- Lightning hooks ----------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:  # noqa: D102
        rank = int(getattr(trainer, "global_rank", 0) or 0)
        if stage == "fit" and rank > 0 and not self._rank_seeded:
            self.generator.manual_seed(self.seed + rank)
            self._rank_seeded = True

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: D102
        if self.clear_every_epoch:
            self.clear()

    def on_advantages(self, trainer, pl_module, rollouts: Rollouts) -> Rollouts | None:
        """Keep effective rows, replace zero-advantage rows from the buffer, buffer the new ones."""
        if rollouts.advantages is None or rollouts.advantages.dim() != 1:
            raise ValueError("SelectiveSampleBuffer needs rollouts.advantages, one value per row [N]")
        n = len(rollouts)
        if n == 0:
            return None
        step = self._step(trainer)
        pad = self._pad_id(pl_module)
        effective = self._effective(rollouts)  # [N] bool, CPU
        evicted_age = self._evict_old(step)

        zero_idx = (~effective).nonzero().flatten()  # [Z]
        n_replace = 0
        if self._store is not None:
            n_replace = int(math.floor(self.refill_share * zero_idx.numel() + 0.5))
        device = rollouts.completion_ids.device
        was_replayed = (
            rollouts.from_buffer.detach().cpu().bool()
            if rollouts.from_buffer is not None
            else torch.zeros(n, dtype=torch.bool)  # on CPU: buffer bookkeeping
        )
        if n_replace == 0:
            out = rollouts
            if out.from_buffer is None:
                out.from_buffer = torch.zeros(n, dtype=torch.bool, device=device)
        else:
            # the first zero rows (in row order) stay, the last n_replace are replaced, so that
            # whole groups tend to stay or go together
            keep = torch.ones(n, dtype=torch.bool)  # on CPU: buffer bookkeeping
            keep[zero_idx[zero_idx.numel() - n_replace :]] = False
            kept = rollouts.select(keep.nonzero().flatten())
            kept.from_buffer = torch.zeros(len(kept), dtype=torch.bool, device=device)
            replayed = self._replay(n_replace, rollouts, device)
            out = Rollouts.concat([kept, replayed], pad_token_id=pad)

        new_idx = (effective & ~was_replayed).nonzero().flatten()
        evicted_cap = self._store_rows(rollouts.select(new_idx), step, pad) if new_idx.numel() else 0
        n_out = len(out)
        self.last_stats = {
            "ssb/effective_share_before": effective.float().mean().item(),
            "ssb/effective_share_after": self._effective(out).float().mean().item(),
            "ssb/buffer_size": float(len(self)),
            "ssb/replayed_share": n_replace / n_out,
            "ssb/evicted_age": float(evicted_age),
            "ssb/evicted_capacity": float(evicted_cap),
        }
        return out

    # -- checkpointing --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Every rank's buffered rows (plain CPU tensors, lists, dicts), steps, call count and RNG.

        Collective in a distributed run: every rank must call it (Lightning does, when it saves).
        """
        return {"version": 2, "per_rank": all_ranks(self._local_state())}

    def load_state_dict(self, state_dict: dict) -> None:  # noqa: D102
        if "per_rank" not in state_dict:  # version 1: one buffer, saved by rank 0
            self._load_local(state_dict)
            return
        parts = state_dict["per_rank"]
        _, rank = world_and_rank()
        if rank < len(parts):
            self._load_local(parts[rank])
            return
        log.warning("SelectiveSampleBuffer: the checkpoint holds %d rank(s), this is rank %d: starting it "
                    "from an empty buffer", len(parts), rank)
        self.clear()
        self._calls = int(parts[0]["calls"])
        self.generator.manual_seed(self.seed + rank)
        self._rank_seeded = True

    def _local_state(self) -> dict:
        store = None
        if self._store is not None:
            cpu = self._store.map_tensors(lambda t: t.detach().cpu())
            store = {f.name: getattr(cpu, f.name) for f in fields(Rollouts)}
        return {"store": store, "steps": self._steps.clone(), "calls": self._calls,
                "generator": self.generator.get_state()}

    def _load_local(self, state: dict) -> None:
        store = state.get("store")
        if store is not None and "pixel_values" in store:  # checkpoints before per-record media: one tile per row
            pv = store.pop("pixel_values")
            store["media"] = [{} if pv is None else {"pixel_values": pv[i:i + 1]} for i in range(len(store["records"]))]
        self._store = None if store is None else Rollouts(**store)
        self._steps = state["steps"].clone().long()
        self._calls = int(state["calls"])
        self.generator.set_state(state["generator"])
        self._rank_seeded = True

    # -- internals ------------------------------------------------------------------------------------

    def _step(self, trainer) -> int:
        self._calls += 1
        if trainer is not None and hasattr(trainer, "global_step"):
            return int(trainer.global_step)
        return self._calls - 1

    def _pad_id(self, pl_module) -> int:
        tok = getattr(pl_module, "tokenizer", None)
        pad = getattr(tok, "pad_token_id", None)
        return int(pad) if pad is not None else self.pad_token_id

    def _effective(self, r: Rollouts) -> Tensor:
        effective = r.advantages.detach().float().abs().cpu() > self.eps  # [N] NaN -> False
        if r.dropped is not None:
            effective &= ~r.dropped.detach().cpu().bool()
        return effective

    def _evict_old(self, step: int) -> int:
        if self._store is None or self.max_age == 0:
            return 0
        young = (step - self._steps) <= self.max_age  # [M]
        n_old = int((~young).sum())
        if n_old:
            self._keep(young.nonzero().flatten())
        return n_old

    def _keep(self, idx: Tensor) -> None:
        if idx.numel() == 0:
            self.clear()
        else:
            self._store, self._steps = self._store.select(idx).trim_padding(), self._steps[idx]

    def _store_rows(self, new: Rollouts, step: int, pad: int) -> int:
        """Append ``new`` (moved to CPU) to the buffer; evict the oldest beyond capacity."""
        new = new.map_tensors(lambda t: t.detach().cpu()).trim_padding()
        new = replace(new, from_buffer=None)
        steps = torch.full((len(new),), step, dtype=torch.long)  # on CPU: buffer bookkeeping
        if self._store is None:
            self._store, self._steps = new, steps
        else:
            self._store = Rollouts.concat([self._store, new], pad_token_id=pad)
            self._steps = torch.cat([self._steps, steps])
        over = len(self._store) - self.capacity
        if over > 0:
            self._keep(torch.arange(over, len(self._store)))  # on CPU: buffer bookkeeping
        return max(over, 0)

    def _replay(self, n: int, like: Rollouts, device) -> Rollouts:
        """Draw ``n`` buffered rows (with P ~ |A|^alpha), aligned to ``like``'s fields, on ``device``."""
        abs_adv = self._store.advantages.float().abs()  # [M]
        drawable = int((buffer_sample_probs(abs_adv, self.alpha) > 0).sum())
        idx = draw_from_buffer(abs_adv, n, self.alpha, self.generator, replacement=n > drawable)  # [n]
        rows = self._store.select(idx)
        # one new id per (step stored, original group), below every id of the batch
        pairs = torch.stack([self._steps[idx], rows.group_ids.long()])  # [2, n]
        _, inverse = torch.unique(pairs, dim=1, return_inverse=True)  # [n]
        base = min(0, int(like.group_ids.min())) - 1
        rows = replace(rows, group_ids=base - inverse, from_buffer=torch.ones(n, dtype=torch.bool))  # on CPU: moved below  # on CPU: buffer bookkeeping
        return _align(rows, like).to(device)


def _align(rows: Rollouts, like: Rollouts) -> Rollouts:
    """Give replayed ``rows`` the optional fields and reward columns the batch ``like`` has."""
    n = len(rows)
    kw: dict = {}
    for name in _SEQ:
        if getattr(like, name) is None:
            kw[name] = None
        elif getattr(rows, name) is None:
            raise ValueError(
                f"buffered rows have no {name} but the batch does; the buffer cannot replay them "
                "(was the run's configuration changed since they were stored?)"
            )
    for name in ("truncated", "dropped"):
        ref = getattr(like, name)
        if ref is None:
            kw[name] = None
        elif getattr(rows, name) is None:
            kw[name] = torch.zeros(n, dtype=ref.dtype)  # on CPU: buffer bookkeeping
    if like.reward is None:
        kw["reward"] = None
    elif rows.reward is None:
        kw["reward"] = torch.full((n,), float("nan"), dtype=like.reward.dtype)  # on CPU: buffer bookkeeping
    kw["rewards"] = {
        k: rows.rewards[k] if k in rows.rewards else torch.full((n,), float("nan"), dtype=v.dtype)  # on CPU: see _replay  # on CPU: buffer bookkeeping
        for k, v in like.rewards.items()
    }
    return replace(rows, **kw)
