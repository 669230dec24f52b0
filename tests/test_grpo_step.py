"""One real GRPOModule step through a Trainer, checked against numbers the test works out itself.

Faults these catch (each passed the whole suite before, issue 22): the module minimising the
negative of its loss; ``kl_coef``, ``scale_advantages``, the behaviour log-probs (ratio always 1,
so no clipping) or the rows a reward fault dropped never reaching the loss; the LR scheduler
never stepped.

How: a callback records, at every optimizer step (Lightning's ``on_before_optimizer_step``), the
trainable parameters, their gradients and the learning rate. The test then recomputes the
gradient from a plain formula written here (DeepSeekMath eq. 3 with the k3 KL of eq. 4):

    rho_t = exp(logp_t - old_t),  A_i = (r_i - mean_g r) / (std_g r + 1e-6)   (or r_i - mean_g r)
    l_t   = -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) + beta (exp(ref_t - logp_t) - (ref_t - logp_t) - 1)
    L     = mean over kept rows with tokens of (mean over the row's tokens of l_t)      ("sequence")

with rewards from the test's own reward function, and checks that the module's gradient equals
it and is far from the gradient the same formula gives with the option left out: so each option
is shown to reach the loss by its effect on a number, not by spying on a call. The per-token
log-probs come from the module's ``sequence_logprobs`` (its forward pass is tested elsewhere,
``test_shared_prompt.py``, ``test_grpo_module.py``).
"""
from __future__ import annotations

import dataclasses
import math
import zlib

import lightning as L
import pytest
import torch

from lightning_r1v2.callbacks.hooks import RolloutHooks
from lightning_r1v2.data.datamodule import R1V2DataModule
from lightning_r1v2.data.records import read_records
from lightning_r1v2.modules import GRPOModule
from lightning_r1v2.rewards import RewardCallback
from lightning_r1v2.rollout import HFGenerateEngine

G = 4  # group size
EPS_ADV = 1e-6


def parity_reward(completions, **kwargs):
    """1 + (crc32 of the text) mod 2: a fixed function of the text, 1 or 2, that varies inside a group."""
    return [1.0 + zlib.crc32(c.encode()) % 2 for c in completions]


def first_row_faults(completions, id, **kwargs):
    """``parity_reward``, except NaN (a reward fault) on the first row of the batch's first prompt."""
    out = parity_reward(completions)
    out[0] = math.nan
    return out


class Recorder(RolloutHooks):
    """Parameters, gradients and LR at each optimizer step; the rollouts the loss saw."""

    def __init__(self):
        self.steps: list[dict] = []
        self.rollouts = []

    def on_advantages(self, trainer, pl_module, rollouts):
        self.rollouts.append(rollouts)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        named = [(n, p) for n, p in pl_module.model.named_parameters() if p.requires_grad]
        self.steps.append({
            "params": {n: p.detach().clone() for n, p in named},
            "grads": {n: p.grad.detach().clone() for n, p in named},
            "lr": optimizer.param_groups[0]["lr"],
        })


def fit(tiny_data, *, steps=1, reward=parity_reward, on_error="zero", perturb_ref=False, eos=None, hooks=(), **kw):
    """A GRPO run of ``steps`` optimizer steps on 2 prompts x G samples; ``eos``: ``make_eos_likely`` first."""
    torch.manual_seed(0)
    kw = {"lr": 1e-3, "warmup_ratio": 0.0, "max_grad_norm": 0.0, "table_every_n_steps": 0, **kw}
    m = GRPOModule(engine=HFGenerateEngine(max_new_tokens=8, temperature=1.3), group_size=G, **kw)
    if eos is not None:
        eos(m, read_records(tiny_data / "train.jsonl")[0][:4])
    if perturb_ref:  # a reference unlike the policy, so the KL term has a gradient at the first step
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in m.ref_model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    rec = Recorder()
    dm = R1V2DataModule(train_file=str(tiny_data / "train.jsonl"), val_file=None, kind="prompts", batch_size=2)
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RewardCallback(reward, name="r", on_error=on_error, max_failure_share=1.0), *hooks, rec],
    )
    trainer.fit(m, dm)
    return m, rec


def advantages(rewards: torch.Tensor, scale: bool) -> torch.Tensor:
    g = rewards.view(-1, G)
    a = g - g.mean(1, keepdim=True)
    if scale:
        a = a / (g.std(1, keepdim=True) + EPS_ADV)
    return a.flatten()


def loss_by_formula(logp, old, adv, mask, *, eps=0.2, ref=None, beta=0.0, aggregation="sequence"):
    keep = mask > 0
    ratio = torch.exp(torch.where(keep, logp - old, torch.zeros_like(logp)))  # [N, C]
    a = adv[:, None]
    per_tok = -torch.minimum(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)
    if beta:
        d = torch.where(keep, ref - logp, torch.zeros_like(logp))
        per_tok = per_tok + beta * (torch.exp(d) - d - 1)
    if aggregation == "token":
        return (per_tok * mask).sum() / mask.sum()
    n_tok = mask.sum(1)
    per_row = (per_tok * mask).sum(1) / n_tok.clamp(min=1)
    return per_row[n_tok > 0].mean()


def grad_by_formula(m, params, rows, **loss_kw) -> torch.Tensor:
    """Flat gradient of ``loss_by_formula`` at ``params``; ``loss_kw`` may hold ``old=None`` (on-policy)."""
    m.model.load_state_dict(params, strict=False)
    m.model.zero_grad(set_to_none=True)
    logp, _ = m.sequence_logprobs(m.model, rows)
    old = loss_kw.pop("old")
    loss = loss_by_formula(logp, logp.detach() if old is None else old, **loss_kw)
    loss.backward()
    return torch.cat([p.grad.flatten() for n, p in m.model.named_parameters() if n in params])


def flat(d: dict) -> torch.Tensor:
    return torch.cat([v.flatten() for v in d.values()])


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def rewards_of(rows) -> torch.Tensor:
    return torch.tensor(parity_reward(rows.completions))


def test_a_step_lowers_the_batch_loss_and_favours_positive_advantages(tiny_data):
    m, rec = fit(tiny_data, lr=2e-3)
    rows = rec.rollouts[0]
    adv = advantages(rewards_of(rows), scale=True)
    assert (adv > 0).any() and (adv < 0).any()
    mask = rows.completion_mask.float()
    with torch.no_grad():
        after, _ = m.sequence_logprobs(m.model, rows)
        m.model.load_state_dict(rec.steps[0]["params"], strict=False)
        before, _ = m.sequence_logprobs(m.model, rows)
    # the loss of this batch, with the pre-step policy as behaviour policy: ratio 1 before the step
    loss_before = loss_by_formula(before, before, adv, mask)
    loss_after = loss_by_formula(after, before, adv, mask)
    assert loss_after < loss_before - 1e-4
    gain = ((after - before) * mask).sum(1)  # [N] change of each sample's log-probability
    assert gain[adv > 0].mean() > gain[adv < 0].mean()


def test_the_gradient_is_the_formulas_and_scale_advantages_reaches_it(tiny_data):
    for scale in (True, False):
        m, rec = fit(tiny_data, scale_advantages=scale)
        rows, step = rec.rollouts[0], rec.steps[0]
        r = rewards_of(rows)
        mask = rows.completion_mask.float()
        want = grad_by_formula(m, step["params"], rows, old=rows.old_logprobs, adv=advantages(r, scale), mask=mask)
        other = grad_by_formula(m, step["params"], rows, old=rows.old_logprobs, adv=advantages(r, not scale), mask=mask)
        got = flat(step["grads"])
        assert rel(got, want) < 1e-4, scale
        assert rel(other, want) > 0.05  # the option changes the gradient measurably


def test_kl_coef_reaches_the_gradient(tiny_data):
    m, rec = fit(tiny_data, kl_coef=0.5, perturb_ref=True)
    rows, step = rec.rollouts[0], rec.steps[0]
    with torch.no_grad():
        ref, _ = m.sequence_logprobs(m.ref_model, rows)
    mask = rows.completion_mask.float()
    adv = advantages(rewards_of(rows), True)
    want = grad_by_formula(m, step["params"], rows, old=rows.old_logprobs, adv=adv, mask=mask, ref=ref, beta=0.5)
    without = grad_by_formula(m, step["params"], rows, old=rows.old_logprobs, adv=adv, mask=mask)
    got = flat(step["grads"])
    assert rel(got, want) < 1e-4
    assert rel(without, want) > 0.05


def test_behaviour_logprobs_and_clipping_reach_the_second_pass(tiny_data):
    """Second pass over one rollout batch: rho = pi_theta / pi_behaviour is no longer 1 and clips."""
    m, rec = fit(tiny_data, steps=2, updates_per_batch=2, lr=1e-2, clip_eps=0.1)
    assert len(rec.rollouts) == 1 and len(rec.steps) == 2
    rows, step = rec.rollouts[0], rec.steps[1]
    mask = rows.completion_mask.float()
    adv = advantages(rewards_of(rows), True)
    with torch.no_grad():
        m.model.load_state_dict(step["params"], strict=False)
        logp, _ = m.sequence_logprobs(m.model, rows)
    ratio = torch.exp(logp - rows.old_logprobs)[mask.bool()]
    assert ((ratio < 0.9) | (ratio > 1.1)).float().mean() > 0.1  # the band is reached, so clipping matters
    want = grad_by_formula(m, step["params"], rows, old=rows.old_logprobs, adv=adv, mask=mask, eps=0.1)
    on_policy = grad_by_formula(m, step["params"], rows, old=None, adv=adv, mask=mask, eps=0.1)
    unclipped = grad_by_formula(m, step["params"], rows, old=rows.old_logprobs, adv=adv, mask=mask, eps=1e9)
    got = flat(step["grads"])
    assert rel(got, want) < 1e-4
    assert rel(on_policy, want) > 0.05 and rel(unclipped, want) > 0.05


def test_rows_of_a_dropped_group_leave_the_gradient(tiny_data):
    m, rec = fit(tiny_data, reward=first_row_faults, on_error="drop_group")
    rows, step = rec.rollouts[0], rec.steps[0]
    dropped = torch.zeros(len(rows), dtype=torch.bool)
    dropped[:G] = True  # the first prompt's group: its first row's reward was NaN
    r = rewards_of(rows)
    r[0] = 0.0  # a faulty row scores 0
    adv = advantages(r, True)
    assert adv[:G].abs().sum() > 0  # the dropped group does carry advantages
    mask = rows.completion_mask.float()
    want = grad_by_formula(m, step["params"], rows, old=rows.old_logprobs, adv=adv, mask=mask * (~dropped)[:, None])
    kept_all = grad_by_formula(m, step["params"], rows, old=rows.old_logprobs, adv=adv, mask=mask)
    got = flat(step["grads"])
    assert rel(got, want) < 1e-4
    assert rel(kept_all, want) > 0.05


def test_token_aggregation_reaches_the_gradient(tiny_data, make_eos_likely):
    m, rec = fit(tiny_data, aggregation="token", eos=make_eos_likely)
    rows, step = rec.rollouts[0], rec.steps[0]
    mask = rows.completion_mask.float()
    assert len(set(mask.sum(1).tolist())) > 1  # rows of different lengths, so the two means differ
    adv = advantages(rewards_of(rows), True)
    want = grad_by_formula(m, step["params"], rows, old=rows.old_logprobs, adv=adv, mask=mask, aggregation="token")
    seq = grad_by_formula(m, step["params"], rows, old=rows.old_logprobs, adv=adv, mask=mask)
    assert rel(flat(step["grads"]), want) < 1e-4
    assert rel(seq, want) > 0.01


def test_lr_follows_warmup_then_cosine_at_every_optimizer_step(tiny_data):
    """2 rollout batches x 2 passes = 4 optimizer steps, warmup_ratio 0.5 -> 2 warmup steps.

    multiplier(s) = (s + 1) / 2 for s < 2, then floor + (1 - floor) * (1 + cos(pi * (s - 2) / 2)) / 2,
    floor 0.2: s = 0, 1, 2, 3 -> 0.5, 1.0, 1.0, 0.2 + 0.8 * 0.5 = 0.6.
    """
    lr = 1e-3
    _, rec = fit(tiny_data, steps=4, updates_per_batch=2, lr=lr, warmup_ratio=0.5, min_lr_ratio=0.2)
    got = [s["lr"] for s in rec.steps]
    assert got == pytest.approx([0.5 * lr, 1.0 * lr, 1.0 * lr, 0.6 * lr], rel=1e-9)


def test_max_grad_norm_clips_the_gradient_the_optimizer_sees(tiny_data):
    """The recorded gradient is the one handed to the optimizer: clipped to norm 1e-3 when larger."""
    _, rec = fit(tiny_data, max_grad_norm=1e-3)
    assert flat(rec.steps[0]["grads"]).norm() == pytest.approx(1e-3, rel=1e-3)
    _, free = fit(tiny_data)
    assert flat(free.steps[0]["grads"]).norm() > 1e-2  # so the clip did act


class ForgetBehaviourLogprobs(RolloutHooks):
    """An engine that records no sampling log-probs (``old_logprobs`` None), as some do."""

    def on_advantages(self, trainer, pl_module, rollouts):
        return dataclasses.replace(rollouts, old_logprobs=None)


def test_without_sampling_logprobs_the_module_scores_the_behaviour_policy_once(tiny_data):
    """Two passes and no ``old_logprobs`` from the engine: the module scores the rows under the policy
    before the first pass, and the second pass's ratio is against those, not against itself (1)."""
    m, rec = fit(tiny_data, steps=2, updates_per_batch=2, lr=1e-2, clip_eps=0.1, hooks=[ForgetBehaviourLogprobs()])
    rows = rec.rollouts[0]
    assert len(rec.steps) == 2
    mask = rows.completion_mask.float()
    adv = advantages(rewards_of(rows), True)
    with torch.no_grad():
        m.model.load_state_dict(rec.steps[0]["params"], strict=False)
        behaviour, _ = m.sequence_logprobs(m.model, rows)
    step = rec.steps[1]
    want = grad_by_formula(m, step["params"], rows, old=behaviour, adv=adv, mask=mask, eps=0.1)
    on_policy = grad_by_formula(m, step["params"], rows, old=None, adv=adv, mask=mask, eps=0.1)
    got = flat(step["grads"])
    assert rel(got, want) < 1e-4
    assert rel(on_policy, want) > 0.05


class KeepFirstGroup(RolloutHooks):
    """A callback that hands the loss another batch (as the buffer does): the first prompt's group only."""

    def on_advantages(self, trainer, pl_module, rollouts):
        return rollouts.select(list(range(G)))


def test_the_batch_a_callback_returns_is_the_one_the_loss_sees(tiny_data):
    m, rec = fit(tiny_data, hooks=[KeepFirstGroup()])
    rows, step = rec.rollouts[0], rec.steps[0]
    assert len(rows) == G
    adv = advantages(rewards_of(rows), True)
    assert adv.abs().sum() > 0
    want = grad_by_formula(m, step["params"], rows, old=rows.old_logprobs, adv=adv, mask=rows.completion_mask.float())
    assert rel(flat(step["grads"]), want) < 1e-4
