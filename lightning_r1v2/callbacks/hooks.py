"""The small hook protocol between the GRPO module and its callbacks.

The module drives one step as data (DESIGN.md) and, at each stage, calls the matching hook on
every callback of the trainer that defines it, in config order:

1. ``on_rollouts(trainer, module, rollouts)``   -- after sampling; read-only.
2. ``score(rollouts) -> Tensor[N]``              -- only on ``RewardCallback``s: one reward column each.
3. ``on_rewards(trainer, module, rollouts)``     -- reward columns are in ``rollouts.rewards``;
   monitors read them here and may change a reward callback's ``weight`` for later steps.
4. ``on_advantages(trainer, module, rollouts) -> Rollouts | None`` -- advantages are set; a callback
   may return a new batch (the Selective Sample Buffer does), which later callbacks and the loss see.

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
