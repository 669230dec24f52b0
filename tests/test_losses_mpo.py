"""MPO loss and the BCO running mean, against hand-worked numbers."""

import math

import pytest
import torch

from lightning_r1v2.losses import RunningMean, mpo_loss, mpo_rewards


def _softplus_neg(x):  # -log sigmoid(x) = log(1 + e^-x)
    return math.log1p(math.exp(-x))


def _t(*values):
    return tuple(torch.tensor([v]) for v in values)


def test_mpo_terms_by_hand():
    # beta = 0.1, pc - rc = 2, pr - rr = -1 -> r_c = 0.2, r_r = -0.1.
    # L_pref = -log s(0.3) = log(1 + e^-0.3) = 0.5543552
    # L_qual (delta 0) = -log s(0.2) - log s(0.1) = 0.5981389 + 0.6443967 = 1.2425355
    # L_gen = 0.5; loss = 0.8 * 0.5543552 + 0.2 * 1.2425355 + 1.0 * 0.5 = 1.1919913
    pc, rc, pr, rr = _t(-10.0, -12.0, -20.0, -19.0)
    loss, stats = mpo_loss(pc, pr, rc, rr, chosen_nll=torch.tensor([0.5]), beta=0.1)
    assert loss.item() == pytest.approx(1.1919913014658543, abs=1e-6)
    assert stats["loss/pref"].item() == pytest.approx(0.5543552444685271, abs=1e-6)
    assert stats["loss/qual"].item() == pytest.approx(1.2425355294551625, abs=1e-6)
    assert stats["loss/gen"].item() == pytest.approx(0.5, abs=1e-7)
    assert stats["rewards/chosen"].item() == pytest.approx(0.2, abs=1e-6)
    assert stats["rewards/rejected"].item() == pytest.approx(-0.1, abs=1e-6)
    assert stats["rewards/margin"].item() == pytest.approx(0.3, abs=1e-6)
    assert stats["rewards/accuracy"].item() == 1.0
    assert stats["logps/chosen"].item() == -10.0 and stats["logps/rejected"].item() == -20.0
    assert stats["delta"].item() == 0.0
    assert all(not v.requires_grad for v in stats.values())


def test_mpo_delta_shifts_only_the_quality_term():
    # delta = 0.05: L_qual = -log s(0.2 - 0.05) - log s(-(-0.1 - 0.05)) = 2 * log(1 + e^-0.15)
    # = 1.2419141; L_pref unchanged.
    pc, rc, pr, rr = _t(2.0, 0.0, -1.0, 0.0)
    _, stats = mpo_loss(pc, pr, rc, rr, torch.tensor([0.0]), beta=0.1, delta=torch.tensor(0.05))
    assert stats["loss/qual"].item() == pytest.approx(1.2419140955790642, abs=1e-6)
    assert stats["loss/pref"].item() == pytest.approx(0.5543552444685271, abs=1e-6)
    assert stats["delta"].item() == pytest.approx(0.05)


def test_mpo_parity_with_loop_reference_and_weights():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, generator=g) * 5 - 30 for _ in range(4))
    nll = torch.rand(6, generator=g)
    beta, delta, (wp, wq, wg) = 0.2, 0.3, (0.5, 0.7, 0.9)
    total, correct = 0.0, 0
    for i in range(6):
        c, r = beta * (pc[i] - rc[i]).item(), beta * (pr[i] - rr[i]).item()
        qual = _softplus_neg(c - delta) + _softplus_neg(delta - r)
        total += wp * _softplus_neg(c - r) + wq * qual + wg * nll[i].item()
        correct += c > r
    loss, stats = mpo_loss(pc, pr, rc, rr, nll, beta=beta, delta=delta, weights=(wp, wq, wg))
    assert loss.item() == pytest.approx(total / 6, abs=1e-5)
    assert stats["rewards/accuracy"].item() == pytest.approx(correct / 6)
    c_r, r_r = mpo_rewards(pc, pr, rc, rr, beta)
    torch.testing.assert_close(c_r, beta * (pc - rc))
    torch.testing.assert_close(r_r, beta * (pr - rr))


def test_mpo_gradient_by_hand():
    # B = 1, r_c = 0.2, r_r = -0.1, delta 0. d(-log s(x))/dx = -(1 - s(x)), dr_c/dpc = beta:
    # dL/dpc = -0.1 * (0.8 * (1 - s(0.3)) + 0.2 * (1 - s(0.2))) = -0.0430479
    pc = torch.tensor([2.0], requires_grad=True)
    delta = torch.tensor(0.0, requires_grad=True)
    pr, rc, rr, nll = _t(-1.0, 0.0, 0.0, 0.0)
    loss, _ = mpo_loss(pc, pr, rc, rr, nll, delta=delta)
    loss.backward()
    assert pc.grad.item() == pytest.approx(-0.043047918708817724, abs=1e-7)
    assert delta.grad is None  # delta is a constant of the loss


def test_running_mean_count_weighted_and_state_round_trip():
    rm = RunningMean()
    assert rm.value == 0.0
    assert rm.update(torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(2.0)  # (1+2+3)/3
    assert rm.update(torch.tensor([6.0])) == pytest.approx(3.0)  # (2*3 + 6) / 4
    assert rm.update(torch.tensor([])) == pytest.approx(3.0)  # empty batch: no change
    state = rm.state_dict()
    assert state == {"mean": 3.0, "count": 4}
    assert type(state["mean"]) is float and type(state["count"]) is int
    other = RunningMean()
    other.load_state_dict(state)
    assert other.update(torch.tensor([-2.0])) == pytest.approx(2.0)  # (3*4 - 2) / 5
    with pytest.raises(ValueError, match="non-finite"):
        rm.update(torch.tensor([float("nan")]))


def test_running_mean_momentum():
    rm = RunningMean(momentum=0.9)
    assert rm.update(torch.tensor([1.0, 3.0])) == pytest.approx(2.0)  # first: batch mean
    assert rm.update(torch.tensor([4.0])) == pytest.approx(2.2)  # 0.9*2 + 0.1*4
    with pytest.raises(ValueError, match="momentum"):
        RunningMean(momentum=1.0)


def test_delta_convention_value_before_update():
    # Step 1 uses delta = 0 (value before the first update); step 2 uses the step-1 mean.
    rm = RunningMean()
    pc, rc, pr, rr = _t(2.0, 0.0, -1.0, 0.0)
    _, s1 = mpo_loss(pc, pr, rc, rr, torch.tensor([0.0]), delta=rm.value)
    rm.update(torch.cat(mpo_rewards(pc, pr, rc, rr)).detach())  # (0.2 + -0.1) / 2 = 0.05
    _, s2 = mpo_loss(pc, pr, rc, rr, torch.tensor([0.0]), delta=rm.value)
    assert s1["delta"].item() == 0.0 and s2["delta"].item() == pytest.approx(0.05, abs=1e-7)
