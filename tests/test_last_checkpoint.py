"""last.ckpt holds the final step even when max_steps is not a multiple of every_n_train_steps."""
import lightning as L
import torch

from lightning_r1v2.callbacks import LastCheckpoint


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))

    def training_step(self, batch, batch_idx):
        return ((self.w - batch[0]) ** 2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(20, 2), batch_size=1)


def _fit(tmp_path, cls, max_steps=5):
    ckpt = cls(dirpath=tmp_path, save_last=True, every_n_train_steps=2, enable_version_counter=False)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, callbacks=[ckpt],
                        enable_progress_bar=False, enable_model_summary=False)
    m = _Tiny()
    trainer.fit(m)
    return torch.load(tmp_path / "last.ckpt", weights_only=False), m


def test_lightning_leaves_last_behind_and_ours_does_not(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    stale, _ = _fit(tmp_path / "lightning", ModelCheckpoint)
    assert stale["global_step"] == 4  # the trap this callback exists for: step 5 is lost
    final, m = _fit(tmp_path / "ours", LastCheckpoint)
    assert final["global_step"] == 5
    assert torch.equal(final["state_dict"]["w"], m.w.detach())
    # save_top_k=1 without a monitor keeps the newest step checkpoint beside last.ckpt
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]


def test_no_extra_save_when_the_last_step_was_saved(tmp_path):
    final, _ = _fit(tmp_path, LastCheckpoint, max_steps=4)
    assert final["global_step"] == 4


class _Manual(_Tiny):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(((self.w - batch[0]) ** 2).sum())
        opt.step()


def _manual_fit_warnings(tmp_path, cls, recwarn):
    ckpt = cls(dirpath=tmp_path, save_last=True, every_n_train_steps=2, enable_version_counter=False)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, callbacks=[ckpt],
                        enable_progress_bar=False, enable_model_summary=False)
    recwarn.clear()
    trainer.fit(_Manual())
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 4
    return [str(w.message) for w in recwarn if "manual optimization" in str(w.message)]


def test_manual_optimization_saves_without_lightnings_warning(tmp_path, recwarn):
    from lightning.pytorch.callbacks import ModelCheckpoint

    assert _manual_fit_warnings(tmp_path / "lightning", ModelCheckpoint, recwarn)  # warns at each step save
    assert _manual_fit_warnings(tmp_path / "ours", LastCheckpoint, recwarn) == []


def test_final_save_resumes_inside_the_stopped_epoch(tmp_path):
    """max_steps stops mid-epoch (step 5 of 20): last.ckpt must not claim the epoch is over, or a
    resume skips its other 15 batches. A save in on_train_end would hold current_epoch 1."""
    final, _ = _fit(tmp_path, LastCheckpoint)
    assert final["global_step"] == 5 and final["epoch"] == 0
    loops = final["loops"]["fit_loop"]
    assert loops["epoch_progress"]["current"]["completed"] == 0
    assert loops["epoch_loop.batch_progress"]["current"]["processed"] == 5
    resumed = LastCheckpoint(dirpath=tmp_path / "resumed", save_last=True, every_n_train_steps=100)
    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, callbacks=[resumed],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_Tiny(), ckpt_path=str(tmp_path / "last.ckpt"))
    after = torch.load(tmp_path / "resumed" / "last.ckpt", weights_only=False)
    assert after["epoch"] == 0 and after["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 8
