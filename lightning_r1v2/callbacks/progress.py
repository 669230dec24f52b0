"""The training progress bar of a GRPO run, counted in rollout batches.

Lightning's training bar counts batches but takes its total from ``max_steps - global_step``
(one optimizer step per batch): with 2 updates per batch a run would end at "150/300". The bar's
count is the batch index in the epoch (continued on a mid-epoch resume, where no
``on_train_epoch_start`` runs), so the total is set in those terms, after the bar set its own.
``GRPOModule.configure_callbacks`` adds this callback to every GRPO run.
"""
from __future__ import annotations

import logging
import math

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

log = logging.getLogger("lightning_r1v2.callbacks")


class RolloutBatchProgress(Callback):
    """Sets the training bar's total to the rollout batches the run will take (TQDM and Rich bars)."""

    def on_train_epoch_start(self, trainer, pl_module):
        self._correct(trainer, pl_module, done=0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._correct(trainer, pl_module, done=batch_idx + 1)

    @staticmethod
    def _correct(trainer, pl_module, done: int) -> None:
        """Total = ``done`` + the rollout batches ``max_steps`` leaves, at most the epoch's batches."""
        bar = trainer.progress_bar_callback
        prompts = getattr(trainer.train_dataloader, "batch_size", None)  # per device
        if bar is None or trainer.max_steps is None or trainer.max_steps < 0 or not prompts:
            return
        per_batch = pl_module.optimizer_steps_per_batch(prompts)
        left = math.ceil(max(trainer.max_steps - trainer.global_step, 0) / per_batch)
        total = min(trainer.num_training_batches, done + left)
        if isinstance(bar, TQDMProgressBar):
            if bar.train_progress_bar.total != total:
                bar.train_progress_bar.total = total
                bar.train_progress_bar.refresh()  # a no-op on a disabled bar
        elif isinstance(bar, RichProgressBar):
            if bar.progress is not None and bar.train_progress_bar_id is not None:  # None: disabled, or not shown yet
                kw = {}
                if trainer.max_epochs is not None and trainer.max_epochs < 0:  # a max_steps run: Lightning writes "Epoch 2/-2"
                    kw["description"] = f"Epoch {trainer.current_epoch}"
                bar.progress.update(bar.train_progress_bar_id, total=total, **kw)
                bar.refresh()
        else:
            log.debug("%s counts optimizer steps, not rollout batches: its total is left as it is", type(bar).__name__)
