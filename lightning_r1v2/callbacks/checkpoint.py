"""``ModelCheckpoint`` whose ``last.ckpt`` always holds the final weights of a run.

Lightning's ``ModelCheckpoint(save_last=True, every_n_train_steps=N)`` refreshes ``last.ckpt``
only when it saves a step checkpoint, and at the end of training only if it never saved one
(``ModelCheckpoint.on_train_end``, Lightning 2.6). A run whose ``max_steps`` is not a multiple of
N therefore ends with a ``last.ckpt`` up to N - 1 optimizer steps old, and the next stage (which
reads ``last.ckpt``) silently starts from stale weights. This subclass also saves ``last.ckpt``
at the final step.

Where that save happens matters for a resume. When ``max_steps`` stops a run in the middle of an
epoch, Lightning's fit loop counts the epoch as completed before ``on_train_end`` (``current_epoch``
moves on), so a checkpoint written there resumes at the start of the next epoch: the rest of the
stopped epoch is never trained on, and the data position saved with it belongs to the epoch
before. So the final save is made in ``on_train_batch_end`` of the batch that reaches
``max_steps``, where the loops' state is that of a mid-epoch step checkpoint; ``on_train_end``
only catches the other ways a run ends (``max_time``, ``should_stop``).

It also silences Lightning's warning, at every step save of a manual-optimization module (GRPO),
that the checkpoint holds the weights after ``optimizer.step()``: those are the weights meant.
"""
from __future__ import annotations

import warnings

from lightning.pytorch.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that writes ``last.ckpt`` at the end of training if it is behind.

    Same arguments as Lightning's ``ModelCheckpoint``; ``save_last`` defaults to True here (with
    ``save_last="link"`` the end-of-training behaviour is Lightning's).
    """

    def __init__(self, *args, save_last: bool | str = True, **kwargs):
        super().__init__(*args, save_last=save_last, **kwargs)

    def on_train_batch_end(self, trainer, pl_module, *args, **kwargs) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
            super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        max_steps = trainer.max_steps
        if max_steps is not None and 0 < max_steps <= trainer.global_step:  # the fit loop stops after this batch
            self._save_final_last(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_final_last(trainer)

    def _save_final_last(self, trainer) -> None:
        if self.save_last is True and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_global_step_saved = trainer.global_step
