"""One real SFTModule / MPOModule step through a Trainer, checked against formulas written here.

Faults these catch (each passed the whole suite before, issue 22): a module minimising the
negative of its loss (the policy walks uphill), MPO's running delta updated before the loss
reads it, the LR schedule not followed.

A callback records the batch and the parameters at the start of each step, and the gradient
and LR at each optimizer step. The test recomputes the loss from the recorded batch with plain
torch (``F.cross_entropy``; the MPO equations below) and compares.
"""
from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback

from lightning_r1v2.data.datamodule import R1V2DataModule
from lightning_r1v2.data.pairs import PreferenceDataModule
from lightning_r1v2.modules import MPOModule, SFTModule


class Recorder(Callback):
    def __init__(self):
        self.batches, self.params, self.grads, self.lrs, self.metrics = [], [], [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch)
        self.params.append({n: p.detach().clone() for n, p in pl_module.model.named_parameters()})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters()
                           if p.grad is not None})
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def _fit(module, dm, steps):
    rec = Recorder()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, gradient_clip_val=None, callbacks=[rec])
    trainer.fit(module, dm)
    return rec


def _rel(a: dict, b: dict) -> float:
    x = torch.cat([a[n].flatten() for n in b])
    y = torch.cat([b[n].flatten() for n in b])
    return float((x - y).norm() / y.norm())


def _grads_of(model, params: dict, loss_fn) -> dict:
    model.load_state_dict(params, strict=False)  # lm_head is tied to the embeddings
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------------ SFT
def sft_loss_by_formula(model, batch) -> torch.Tensor:
    """Mean next-token NLL over response tokens: cross_entropy(logits[:, :-1], labels[:, 1:], ignore -100)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=torch.cat([m["pixel_values"] for m in batch["media"]]))
    logits = out.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=-100)


def _sft(tiny_data, steps, **kw):
    torch.manual_seed(0)
    m = SFTModule(**{"lr": 1e-3, "warmup_ratio": 0.0, **kw})
    dm = R1V2DataModule(train_file=str(tiny_data / "train.jsonl"), val_file=None, kind="sft", batch_size=4)
    return m, _fit(m, dm, steps)


def test_sft_step_is_the_cross_entropy_gradient_and_lowers_the_batch_loss(tiny_data):
    m, rec = _sft(tiny_data, 1)
    batch = rec.batches[0]
    trained = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    want = _grads_of(m.model, rec.params[0], lambda: sft_loss_by_formula(m.model, batch))
    assert _rel(rec.grads[0], want) < 1e-4
    with torch.no_grad():
        m.model.load_state_dict(rec.params[0], strict=False)
        before = float(sft_loss_by_formula(m.model, batch))
        m.model.load_state_dict(trained, strict=False)
        after = float(sft_loss_by_formula(m.model, batch))
    assert after < before - 1e-3, (before, after)


def test_sft_lr_at_each_step(tiny_data):
    """4 steps, warmup_ratio 0.5 -> 2 warmup steps, floor 0.2: multipliers (s + 1) / 2 for s < 2,
    then 0.2 + 0.8 (1 + cos(pi (s - 2) / 2)) / 2: 0.5, 1.0, 1.0, 0.6."""
    lr = 2e-3
    m, rec = _sft(tiny_data, 4, lr=lr, warmup_ratio=0.5, min_lr_ratio=0.2, weight_decay=0.1)
    assert rec.lrs == pytest.approx([0.5 * lr, lr, lr, 0.6 * lr], rel=1e-9)
    # AdamW's weight decay reaches matrices only (not biases, norms): the groups of the optimizer
    decay, no_decay = m.trainer.optimizers[0].param_groups
    matrices = {id(p) for p in m.model.parameters() if p.requires_grad and p.dim() >= 2}
    assert decay["weight_decay"] == 0.1 and {id(p) for p in decay["params"]} == matrices
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) > 0
    assert not matrices & {id(p) for p in no_decay["params"]}


# ------------------------------------------------------------------------------------------ MPO
def mpo_loss_by_formula(m, batch, delta, beta=0.1, weights=(0.8, 0.2, 1.0), gen_mean=True) -> torch.Tensor:
    """InternVL MPO (arXiv 2411.10442), per pair, then the batch mean:

    r_c = beta (log pi(y_c) - log pi_ref(y_c)),  r_r likewise
    L = w_p (-log sig(r_c - r_r)) + w_q (-log sig(r_c - delta) - log sig(delta - r_r)) + w_g (-log pi(y_c) / |y_c|)
    """
    B = len(batch["pair_ids"])
    logp, n_tok = m.response_logprobs(m.model, batch)  # [2B] summed over response tokens
    with torch.no_grad():
        ref, _ = m.response_logprobs(m.ref_model, batch)
    r_c, r_r = beta * (logp[:B] - ref[:B]), beta * (logp[B:] - ref[B:])
    w_p, w_q, w_g = weights
    per_pair = (w_p * -F.logsigmoid(r_c - r_r)
                + w_q * (-F.logsigmoid(r_c - delta) - F.logsigmoid(delta - r_r))
                + w_g * (-logp[:B] / (n_tok[:B] if gen_mean else 1.0)))
    return per_pair.mean()


def _mpo(pairs_file, steps, **kw):
    torch.manual_seed(0)
    m = MPOModule(**{"lr": 1e-3, "warmup_ratio": 0.0, **kw})
    dm = PreferenceDataModule(train_file=str(pairs_file), val_file=None, batch_size=2)
    return m, dm


def test_mpo_step_is_the_formulas_gradient_and_lowers_the_batch_loss(pairs_file):
    """Default weights (0.8, 0.2, 1.0), beta 0.3 (not the default, so a hard-coded 0.1 shows), delta 0."""
    m, dm = _mpo(pairs_file, 1, beta=0.3)
    rec = _fit(m, dm, 1)
    batch = rec.batches[0]
    trained = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    want = _grads_of(m.model, rec.params[0], lambda: mpo_loss_by_formula(m, batch, 0.0, beta=0.3))
    assert _rel(rec.grads[0], want) < 1e-4
    sum_nll = _grads_of(m.model, rec.params[0], lambda: mpo_loss_by_formula(m, batch, 0.0, beta=0.3, gen_mean=False))
    assert _rel(sum_nll, want) > 0.05  # L_gen is the mean token NLL, not the sum
    with torch.no_grad():
        m.model.load_state_dict(rec.params[0], strict=False)
        before = float(mpo_loss_by_formula(m, batch, delta=0.0, beta=0.3))
        m.model.load_state_dict(trained, strict=False)
        after = float(mpo_loss_by_formula(m, batch, delta=0.0, beta=0.3))
    assert after < before - 1e-3, (before, after)


def test_mpo_reads_delta_before_updating_it(pairs_file):
    """delta held 0.3 over 4 rewards before the step: the loss must use 0.3, then fold this step's
    2 x 2 rewards in: delta_next = (0.3 * 4 + sum r) / (4 + 4). Only the BCO term (weights 0, 1, 0),
    so the gradient depends on delta: d/dr_c -log sig(r_c - delta) = -sig(delta - r_c)."""
    m, dm = _mpo(pairs_file, 1, weights=(0.0, 1.0, 0.0))
    m.delta.load_state_dict({"mean": 0.3, "count": 4})
    rec = _fit(m, dm, 1)
    batch = rec.batches[0]
    B = len(batch["pair_ids"])
    with torch.no_grad():
        m.model.load_state_dict(rec.params[0], strict=False)
        logp, _ = m.response_logprobs(m.model, batch)
        ref, _ = m.response_logprobs(m.ref_model, batch)
    rewards = 0.1 * (logp - ref)  # [2B]: chosen then rejected
    updated = (0.3 * 4 + float(rewards.sum())) / (4 + 2 * B)
    assert abs(updated - 0.3) > 0.1  # the two orders give different deltas
    assert rec.metrics[0]["train/delta"] == pytest.approx(0.3, abs=1e-6)
    assert rec.metrics[0]["train/delta_next"] == pytest.approx(updated, abs=1e-6)
    assert m.delta.count == 4 + 2 * B
    w = (0.0, 1.0, 0.0)
    want = _grads_of(m.model, rec.params[0], lambda: mpo_loss_by_formula(m, batch, 0.3, weights=w))
    late = _grads_of(m.model, rec.params[0], lambda: mpo_loss_by_formula(m, batch, updated, weights=w))
    assert _rel(rec.grads[0], want) < 1e-4
    assert _rel(late, want) > 0.02


def test_mpo_reference_stays_in_eval_mode():
    """The reference never drops out: ``train()`` (Lightning calls it at fit start) leaves it in eval mode."""
    m = MPOModule()
    m.train()
    assert m.model.training and not m.ref_model.training
    assert not any(mod.training for mod in m.ref_model.modules())
