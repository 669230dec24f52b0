"""The hook protocol between the GRPO module and its callbacks: the whole of it.

The module drives one step as data (docs/architecture.md) and, at each stage, calls the matching
hook on every callback of the trainer that defines it, in config order:

1. ``on_rollouts(trainer, module, rollouts)``   -- after sampling; read-only.
2. ``score(rollouts) -> Tensor[N]``              -- reward callbacks only: one reward column each,
   stored by the module as ``rollouts.rewards[callback.name]``.
3. ``on_rewards(trainer, module, rollouts)``     -- the reward columns are in ``rollouts.rewards``;
   monitors read them here. The combined reward is computed after this hook, with the weights
   the reward callbacks have then.
4. ``on_advantages(trainer, module, rollouts) -> Rollouts | None`` -- advantages are set; a callback
   may return a new batch (the Selective Sample Buffer does), which later callbacks and the loss see.

Besides the hooks, callbacks meet the module and each other only through these names:

- ``last_stats: dict[str, float]`` -- metrics of the callback's last step; the module logs the
  union of every callback's (``step_stats(trainer)``) with its own.
- A *reward callback* is one with ``score``, ``name``, ``weight`` (and optionally ``group``, for
  the ``gate`` mode, and ``last_dropped``: ``[N]`` bool rows to leave out of the loss after its
  last ``score``): ``reward_callbacks(trainer)`` lists them in config order; ``score`` returns
  its column and changes nothing else.
  ``RewardCallback`` (``rewards/callback.py``) wraps a plain reward function this way.
- Another callback changes a reward's weight only through ``set_reward_weight(trainer, name, w)``.

A callback opts in by defining the method; subclassing ``RolloutHooks`` is only a convenience.
"""
from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback


class RolloutHooks(Callback):
    """No-op defaults for the rollout hooks (subclass and override what you need)."""

    def on_rollouts(self, trainer, pl_module, rollouts) -> None:  # noqa: D102
        return None

    def on_rewards(self, trainer, pl_module, rollouts) -> None:  # noqa: D102
        return None

    def on_advantages(self, trainer, pl_module, rollouts):  # noqa: D102
        return None


def call_rollout_hook(trainer, pl_module, name: str, rollouts) -> Any:
    """Call hook ``name`` on every trainer callback that has it; thread a returned batch through."""
    callbacks = getattr(trainer, "callbacks", []) if trainer is not None else []
    for cb in callbacks:
        fn = getattr(cb, name, None)
        if fn is None:
            continue
        out = fn(trainer, pl_module, rollouts)
        if out is not None and name == "on_advantages":
            rollouts = out
    return rollouts


def is_reward_callback(cb) -> bool:
    """``cb`` scores rollouts: it has ``score(rollouts)``, a ``name`` and a ``weight``."""
    return callable(getattr(cb, "score", None)) and hasattr(cb, "name") and hasattr(cb, "weight")


def reward_callbacks(trainer) -> list:
    """The trainer's reward callbacks, in config order."""
    return [cb for cb in (getattr(trainer, "callbacks", None) or []) if is_reward_callback(cb)]


def set_reward_weight(trainer, name: str, weight: float):
    """Set the weight of reward ``name`` (from the next combination of rewards on); returns its callback."""
    cbs = reward_callbacks(trainer)
    for cb in cbs:
        if cb.name == name:
            cb.weight = float(weight)
            return cb
    raise ValueError(f"no reward callback named {name!r}; reward callbacks of the trainer: {[c.name for c in cbs]}")


def step_stats(trainer) -> dict:
    """The union of every callback's ``last_stats`` (later callbacks win on a shared key)."""
    out: dict = {}
    for cb in getattr(trainer, "callbacks", None) or []:
        out.update(getattr(cb, "last_stats", None) or {})
    return out
