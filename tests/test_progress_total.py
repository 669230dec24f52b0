"""The training progress bar counts rollout batches, not optimizer steps.

``trainer.max_steps`` counts optimizer steps and GRPO takes ``updates_per_batch`` x mini-batches
of them per rollout batch; Lightning's bar assumes one per batch (its total would be 4 below,
ending at "2/4"). ``GRPOModule`` corrects the total, for Lightning's TQDM and Rich bars, also on a
resume in the middle of an epoch (where the bar counts on from the batches already done).
"""
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar

from lightning_r1v2.data.datamodule import R1V2DataModule
from lightning_r1v2.modules import GRPOModule
from lightning_r1v2.rewards import RewardCallback, format_reward
from lightning_r1v2.rollout import HFGenerateEngine


def _bar_state(cb):
    """``(n, total)`` of the training bar of a TQDM or Rich progress bar callback."""
    if isinstance(cb, TQDMProgressBar):
        return cb.train_progress_bar.n, cb.train_progress_bar.total
    task = cb.train_progress_bar
    return task.completed, task.total


def _recording(base):
    class Recording(base):
        """Records the bar's total at every batch start (what is shown during the batch) and at the end."""

        def __init__(self):
            super().__init__()
            self.totals, self.final = [], None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
            if isinstance(self, TQDMProgressBar) or self.train_progress_bar_id is not None:
                self.totals.append(_bar_state(self)[1])

        def on_train_end(self, trainer, pl_module):
            self.final = _bar_state(self)
            if not isinstance(self, TQDMProgressBar):
                self.description = self.train_progress_bar.description
            super().on_train_end(trainer, pl_module)

    return Recording()


def _fit(tiny_data, bar, max_steps, callbacks=(), ckpt_path=None):
    torch.manual_seed(0)
    m = GRPOModule(engine=HFGenerateEngine(max_new_tokens=2), group_size=2, lr=1e-3,
                   updates_per_batch=2, table_every_n_steps=0)
    dm = R1V2DataModule(train_file=str(tiny_data / "train.jsonl"), val_file=None, kind="prompts", batch_size=1)
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=bool(callbacks),
        enable_model_summary=False, callbacks=[RewardCallback(format_reward, name="format"), bar, *callbacks],
    )
    trainer.fit(m, dm, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("base", [TQDMProgressBar, RichProgressBar])
def test_bar_total_is_rollout_batches(tiny_data, base):
    bar = _recording(base)
    trainer = _fit(tiny_data, bar, max_steps=4)  # 2 rollout batches x 2 updates
    assert trainer.global_step == 4 and trainer.num_training_batches > 4
    assert bar.totals == [2, 2]
    assert bar.final == (2, 2)
    if base is RichProgressBar:  # a max_steps run has max_epochs -1: Lightning's own text is "Epoch 0/-2"
        assert bar.description.strip() == "Epoch 0"


@pytest.mark.parametrize("base", [TQDMProgressBar, RichProgressBar])
def test_bar_total_after_a_mid_epoch_resume(tiny_data, tmp_path, base):
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_last=True)
    first = _recording(base)
    _fit(tiny_data, first, max_steps=2, callbacks=[ckpt])  # one rollout batch, then stop
    assert first.final == (1, 1)
    bar = _recording(base)
    trainer = _fit(tiny_data, bar, max_steps=6, ckpt_path=str(tmp_path / "last.ckpt"))
    assert trainer.global_step == 6
    # the bar counts on from the batch already done in this epoch: 2 more batches, ending at 3/3
    # (Lightning: "3/None" with TQDM, "3/2" with Rich)
    assert bar.final == (3, 3)
    # no on_train_epoch_start on a mid-epoch resume: during the first resumed batch TQDM's bar has
    # no total yet and Rich's train bar does not exist yet; both are right from its end on
    assert bar.totals == ([None, 3] if base is TQDMProgressBar else [3])


def test_lr_schedule_spans_the_optimizer_steps_of_an_epoch_run(tiny_data):
    """With ``max_epochs`` (no ``max_steps``) the cosine schedule covers every optimizer step taken,
    not one per rollout batch (which would end the schedule halfway with 2 updates per batch)."""
    torch.manual_seed(0)
    m = GRPOModule(engine=HFGenerateEngine(max_new_tokens=2), group_size=2, lr=1e-3, updates_per_batch=2,
                   table_every_n_steps=0)
    dm = R1V2DataModule(train_file=str(tiny_data / "train.jsonl"), val_file=None, kind="prompts", batch_size=8,
                        max_train_records=24)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False,
                        callbacks=[RewardCallback(format_reward, name="format")])
    trainer.fit(m, dm)
    assert trainer.global_step == 6  # 24 prompts / 8 = 3 rollout batches x 2 updates
    assert m._total_steps() == trainer.global_step
