"""Hallucination monitoring: per-step rates of hallucination signals in the rollouts.

Skywork R1V2 (arXiv 2504.16656) reports that too much reinforcement signal raises visual
hallucination, without publishing how it measured it; R1V3 (arXiv 2507.06167) counts chains of
thought that claim not to see the image (47 of 900 on MMMU, far less accurate). This module
measures three signals that need no judge model:

- ``contradiction``: the reasoning makes claims about the image ("red 2 green 0", the grammar of
  the synthetic task's reference responses) that the record's ``annotations["counts"]`` contradict.
  ``contradiction_rate`` = rows with at least one false claim / rows that make claims;
  ``claim_error_rate`` = false claims / all claims (both NaN when no row makes a claim).
- ``denial``: the completion says it cannot see the image (``denial_rate`` over all rows).
- ``empty_reasoning``: a boxed answer with no reasoning block or an empty one, i.e. an answer
  that ignores the image (``empty_reasoning_rate`` over all rows).

``HallucinationMonitor`` computes them in ``on_rewards`` and, when a rate exceeds its threshold for
``patience`` consecutive steps, warns, lowers a reward callback's weight, or stops training.
In a distributed run the counts are summed over ranks first, so every rank sees the same rates
and takes the same decision (the weights stay equal across ranks; all ranks stop together).
"""
from __future__ import annotations

import logging

import torch

from lightning_r1v2.callbacks.hooks import RolloutHooks, reward_callbacks, set_reward_weight

from ..rewards.claims import (
    COLOUR_WORDS,
    DEFAULT_DENIAL_PHRASES,
    DEFAULT_THRESHOLDS,
    RATE_NAMES,
    _rates_from_counts,
    checked_claims,
    contradicted_claims,
    count_claims,
    denies_seeing,
    empty_reasoning,
    hallucination_counts,
    rates,
    reasoning_text,
    scene_counts,
)

__all__ = [  # the claim grammar's names (rewards/claims.py) stay importable from here
    "checked_claims",
    "count_claims",
    "scene_counts",
    "COLOUR_WORDS",
    "DEFAULT_DENIAL_PHRASES",
    "DEFAULT_THRESHOLDS",
    "RATE_NAMES",
    "contradicted_claims",
    "denies_seeing",
    "empty_reasoning",
    "reasoning_text",
    "hallucination_counts",
    "rates",
    "HallucinationMonitor",
]

log = logging.getLogger(__name__)

ACTIONS = ("warn", "scale_reward", "stop")


class HallucinationMonitor(RolloutHooks):
    """Log hallucination rates of each step's rollouts and act when one stays above its threshold.

    After ``on_rewards``, ``self.last_stats`` holds ``hallucination/contradiction_rate``,
    ``hallucination/claim_error_rate``, ``hallucination/denial_rate``,
    ``hallucination/empty_reasoning_rate`` (the module logs them) and, with
    ``action="scale_reward"``, ``hallucination/reward_weight``.

    A rate "exceeds" its threshold when strictly above it (a NaN rate never does and resets the
    streak). After ``patience`` consecutive steps over, the monitor acts once for that step (one
    message naming every offending rate) and restarts that rate's count, so a rate that stays high
    triggers again every ``patience`` steps (with ``scale_reward``: weight * scale each time).
    """

    def __init__(
        self,
        phrases: list[str] | None = None,
        thresholds: dict[str, float] | None = None,
        action: str = "warn",
        reward_name: str | None = None,
        scale: float = 0.5,
        min_weight: float = 0.0,
        patience: int = 1,
    ):
        """
        Args:
            phrases: Phrases that deny seeing the image (None: ``DEFAULT_DENIAL_PHRASES``).
            thresholds: Rate name (``contradiction``, ``claim_error``, ``denial``,
                ``empty_reasoning``) -> threshold in [0, 1]; None: ``DEFAULT_THRESHOLDS``
                (contradiction 0.5, denial 0.1, empty_reasoning 0.5); ``{}``: log only.
            action: What to do when a rate stays over its threshold: ``warn`` (log a warning),
                ``scale_reward`` (multiply the weight of reward ``reward_name`` by ``scale``) or
                ``stop`` (set ``trainer.should_stop``; the reason goes to ``self.stopped_reason``).
            reward_name: ``name`` of the reward callback whose weight ``scale_reward`` lowers.
            scale: Factor applied to that weight at each action, in [0, 1].
            min_weight: The weight is never scaled below this.
            patience: Consecutive steps over the threshold before acting.
        """
        super().__init__()
        thresholds = dict(DEFAULT_THRESHOLDS if thresholds is None else thresholds)
        unknown = sorted(set(thresholds) - set(RATE_NAMES))
        if unknown:
            raise ValueError(f"unknown threshold names {unknown}; choose from {list(RATE_NAMES)}")
        for k, v in thresholds.items():
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"threshold {k!r} must be a rate in [0, 1], got {v!r}")
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {list(ACTIONS)}, got {action!r}")
        if action == "scale_reward" and not reward_name:
            raise ValueError("action='scale_reward' needs reward_name (the reward callback's name)")
        if not 0.0 <= scale <= 1.0:
            raise ValueError(f"scale must be in [0, 1], got {scale}")
        if min_weight < 0:
            raise ValueError(f"min_weight must be >= 0, got {min_weight}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.phrases = tuple(DEFAULT_DENIAL_PHRASES if phrases is None else phrases)
        self.thresholds = {k: float(v) for k, v in thresholds.items()}
        self.action, self.reward_name = action, reward_name
        self.scale, self.min_weight, self.patience = float(scale), float(min_weight), int(patience)
        self.streaks = {k: 0 for k in self.thresholds}
        self.n_acted = 0
        self.stopped_reason: str | None = None
        self.last_stats: dict[str, float] = {}
        self._calls = 0
        self._weight: float | None = None  # weight set by scale_reward (checkpointed)
        self._restore_weight = False

    # -- Lightning hooks ----------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:  # noqa: D102
        if self.action == "scale_reward" and stage == "fit":
            self._reward_callback(trainer)  # fail early on a wrong name

    def on_rewards(self, trainer, pl_module, rollouts) -> None:
        """Compute the step's rates into ``last_stats``; act on those over threshold."""
        step = int(trainer.global_step) if hasattr(trainer, "global_step") else self._calls
        self._calls += 1
        if self.action == "scale_reward" and self._restore_weight:
            set_reward_weight(trainer, self.reward_name, self._weight)
            self._restore_weight = False
        counts = self._reduce(trainer, hallucination_counts(rollouts.completions, rollouts.records, self.phrases))
        values = _rates_from_counts(counts)
        stats = {f"hallucination/{k}": v for k, v in values.items()}
        over = []
        for name, thr in self.thresholds.items():
            value = values[f"{name}_rate"]
            self.streaks[name] = self.streaks[name] + 1 if value > thr else 0  # NaN > thr is False
            if self.streaks[name] >= self.patience:
                over.append((name, value, thr))
                self.streaks[name] = 0
        if over:
            self._act(trainer, over, step)
        if self.action == "scale_reward":
            stats["hallucination/reward_weight"] = float(self._reward_callback(trainer).weight)
        self.last_stats = stats

    # -- checkpointing --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Streak per rate, number of actions, the stop reason and the scaled weight."""
        return {
            "streaks": dict(self.streaks),
            "n_acted": self.n_acted,
            "stopped_reason": self.stopped_reason,
            "calls": self._calls,
            "weight": self._weight,
        }

    def load_state_dict(self, state_dict: dict) -> None:  # noqa: D102
        self.streaks.update({k: int(v) for k, v in state_dict["streaks"].items() if k in self.streaks})
        self.n_acted = int(state_dict["n_acted"])
        self.stopped_reason = state_dict["stopped_reason"]
        self._calls = int(state_dict["calls"])
        self._weight = state_dict["weight"]
        self._restore_weight = self._weight is not None

    # -- internals ------------------------------------------------------------------------------------

    def _act(self, trainer, over: list[tuple[str, float, float]], step: int) -> None:
        what = "; ".join(f"{n}_rate {v:.4g} > threshold {t:.4g}" for n, v, t in over)
        msg = f"HallucinationMonitor at step {step}: {what} ({self.patience} consecutive step(s))"
        self.n_acted += 1
        if self.action == "warn":
            log.warning(msg)
        elif self.action == "scale_reward":
            old = float(self._reward_callback(trainer).weight)
            cb = set_reward_weight(trainer, self.reward_name, max(old * self.scale, self.min_weight))
            self._weight = float(cb.weight)
            log.warning(f"{msg}; reward {self.reward_name!r} weight {old:g} -> {cb.weight:g}")
        else:
            self.stopped_reason = msg
            log.error(f"{msg}; stopping training")
            trainer.should_stop = True

    def _reward_callback(self, trainer):
        rewards = reward_callbacks(trainer)
        for cb in rewards:
            if getattr(cb, "name", None) == self.reward_name:
                return cb
        names = [getattr(cb, "name", None) for cb in rewards]
        raise ValueError(
            f"HallucinationMonitor(action='scale_reward') found no reward callback named "
            f"{self.reward_name!r}; reward callbacks of the trainer: {names}"
        )

    @staticmethod
    def _reduce(trainer, counts: dict[str, int]) -> dict[str, float]:
        """Sum the counts over ranks (no-op in a single process)."""
        strategy = getattr(trainer, "strategy", None)
        if strategy is None or int(getattr(trainer, "world_size", 1) or 1) <= 1:
            return counts
        keys = list(counts)
        t = torch.tensor([counts[k] for k in keys], dtype=torch.float64, device=strategy.root_device)
        t = strategy.reduce(t, reduce_op="sum")
        return {k: float(v) for k, v in zip(keys, t.tolist())}

