"""Gradient accumulation inside a GRPO optimizer step (micro_batch_size): same gradient as one pass."""
import types

import lightning as L
import pytest
import torch

from lightning_r1v2.data.datamodule import R1V2DataModule
from lightning_r1v2.losses import micro_batch_weights
from lightning_r1v2.modules import GRPOModule
from lightning_r1v2.rewards import RewardCallback, format_reward
from lightning_r1v2.rollout import HFGenerateEngine


def test_micro_batch_weights_by_hand():
    # rows with 3, 0 and 1 response tokens, split into micro-batches of 2 and 1 rows
    mask = torch.tensor([[1, 1, 1], [0, 0, 0], [1, 0, 0]])
    # sequence mean runs over the 2 rows with tokens: one in each micro-batch
    assert micro_batch_weights(mask, [2, 1], "sequence") == [0.5, 0.5]
    # token mean runs over 4 tokens: 3 in the first micro-batch, 1 in the second
    assert micro_batch_weights(mask, [2, 1], "token") == [0.75, 0.25]
    assert micro_batch_weights(mask, [1, 1, 1], "sequence") == [0.5, 0.0, 0.5]
    assert micro_batch_weights(torch.zeros(2, 3), [1, 1], "token") == [0.0, 0.0]
    with pytest.raises(ValueError, match="sum to the 3 rows"):
        micro_batch_weights(mask, [2, 2])


class _Grads(L.Callback):
    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.clone() for n, p in pl_module.model.named_parameters() if p.grad is not None})


def _grads(tiny_data, **kw):
    L.seed_everything(0, verbose=False)
    m = GRPOModule(engine=HFGenerateEngine(max_new_tokens=8, temperature=1.3), group_size=4, lr=1e-3,
                   max_grad_norm=0.0, **kw)
    dm = R1V2DataModule(train_file=str(tiny_data / "train.jsonl"), val_file=None, kind="prompts", batch_size=2)
    spy = _Grads()
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[RewardCallback(format_reward, name="format", weight=1.0),
                                   RewardCallback(lambda completions, **k: [float(len(c) % 3) for c in completions],
                                                  name="len", weight=1.0)])
    trainer.callbacks.append(spy)
    trainer.fit(m, dm)
    assert len(spy.grads) == 1
    return spy.grads[0]


@pytest.mark.parametrize("aggregation", ["sequence", "token"])
def test_accumulated_gradient_equals_the_one_pass_gradient(tiny_data, aggregation):
    whole = _grads(tiny_data, aggregation=aggregation)
    accumulated = _grads(tiny_data, aggregation=aggregation, micro_batch_size=3)  # 8 rows: 3 + 3 + 2
    assert whole.keys() == accumulated.keys() and whole
    nonzero = 0
    for n in whole:
        assert torch.allclose(whole[n], accumulated[n], atol=1e-6, rtol=1e-4), n
        nonzero += int(whole[n].abs().sum() > 0)
    assert nonzero > 10  # the rewards differ within groups, so there is a gradient to compare


def test_accumulation_under_deepspeed_needs_unmanaged_accumulation():
    m = GRPOModule(micro_batch_size=2)
    ds = type("DeepSpeedStrategy", (), {"config": {"zero_optimization": {"stage": 2}}})()
    m._trainer = types.SimpleNamespace(strategy=ds)
    with pytest.raises(ValueError, match="managed_gradient_accumulation: false"):
        m._check_accumulation()
    ds.config["managed_gradient_accumulation"] = False
    m._check_accumulation()


def test_negative_batch_sizes_are_refused():
    with pytest.raises(ValueError, match="micro_batch_size"):
        GRPOModule(micro_batch_size=-1)
