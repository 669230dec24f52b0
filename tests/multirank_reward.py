"""Helpers for the multi-rank runs of tests/test_deepspeed_multirank.py (imported by class path)."""
from lightning.pytorch.callbacks import Callback


def length_reward(completions, **kwargs):
    """Varies within groups even for the random-init tiny model (whose task rewards are all 0), so a
    short run has non-zero advantages and fills the sample buffer."""
    return [float(len(c) % 3) for c in completions]


class SeenRecords(Callback):
    """Appends, per training batch, the record ids to ``seen_rank<R>.txt`` and the sampled
    completions to ``completions_rank<R>.txt`` in the working directory."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with open(f"seen_rank{trainer.global_rank}.txt", "a") as f:
            f.write(" ".join(str(r["id"]) for r in batch["records"]) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(f"completions_rank{trainer.global_rank}.txt", "a") as f:
            f.write(repr(pl_module.last_rollouts.completions) + "\n")
