"""GSPO's sequence-level ratio and Dr. GRPO's constant-length aggregation, against hand-worked numbers."""

import math

import pytest
import torch

from lightning_r1v2.losses import grpo_loss, micro_batch_weights


def _two_sequences():
    # old = 0, so the token ratios are exp(logp). Clip 0.2 (band [0.8, 1.2]).
    # seq 0, A = +1, ratios [4, 1]:   GSPO s = sqrt(4 * 1) = 2 -> min(2, 1.2) = 1.2 (clipped high), loss -1.2
    #                                 token level: min(4, 1.2) = 1.2 and 1 -> mean -(1.2 + 1) / 2 = -1.1
    # seq 1, A = -1, ratios [0.81, 1]: GSPO s = sqrt(0.81) = 0.9 -> min(-0.9, -0.9), loss +0.9 (inside)
    #                                 token level: 0.81 and 1 -> mean (0.81 + 1) / 2 = 0.905
    #                                 (column 2 is padding)
    logp = torch.log(torch.tensor([[4.0, 1.0, 1.0], [0.81, 1.0, 1.0]])).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    return logp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), mask


def test_gspo_ratio_and_clipping_per_sequence_by_hand():
    logp, old, adv, mask = _two_sequences()
    loss, stats = grpo_loss(logp, old, adv, mask, clip_eps=0.2, importance_level="sequence")
    assert loss.item() == pytest.approx((-1.2 + 0.9) / 2, abs=1e-6)  # -0.15
    # both tokens of seq 0 are clipped high; ratio mean over the 4 tokens (2 + 2 + 0.9 + 0.9) / 4
    assert stats["clip_ratio/high_mean"].item() == pytest.approx(0.5)
    assert stats["clip_ratio/low_mean"].item() == 0.0
    assert stats["ratio_mean"].item() == pytest.approx(1.45, abs=1e-6)
    loss.backward()
    # seq 0 clipped: no gradient. seq 1: L = (-1.2 + s) / 2, ds/dlogp_t = s / |y| = 0.9 / 2 -> 0.225
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, 0.0], [0.225, 0.225, 0.0]]), atol=1e-6, rtol=0)


def test_token_level_differs_on_the_same_batch():
    logp, old, adv, mask = _two_sequences()
    loss, _ = grpo_loss(logp, old, adv, mask, clip_eps=0.2, importance_level="token")
    assert loss.item() == pytest.approx((-1.1 + 0.905) / 2, abs=1e-6)  # -0.0975
    with pytest.raises(ValueError, match="importance_level"):
        grpo_loss(logp, old, adv, mask, importance_level="group")


def test_gspo_on_policy_equals_grpo():
    # rho = s = 1 everywhere: both gradients are A_i / |y_i| * sum_t grad logp_t per sequence
    # (the sequence mean of GRPO gives the same 1/|y_i| as GSPO's mean log-ratio)
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]], requires_grad=True)
    mask, adv = torch.tensor([[1, 1, 1], [1, 1, 0]]), torch.tensor([0.7, -1.3])
    grads = []
    for level in ("token", "sequence"):
        logp.grad = None
        loss, _ = grpo_loss(logp, logp.detach(), adv, mask, importance_level=level)
        loss.backward()
        grads.append((loss.item(), logp.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-7)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-7, rtol=0)


def test_dr_grpo_constant_length_aggregation_by_hand():
    # On-policy, per-token loss -A. seq 0: A = +1, 3 tokens; seq 1: A = -1, 1 token; seq 2: no tokens.
    # token_sum_norm with L = 4: seq 0 -3/4, seq 1 +1/4, mean over the 2 sequences with tokens = -0.25
    # (sequence mean gives 0, token mean -0.5: see test_grpo_sequence_vs_token_aggregation)
    logp = torch.zeros(3, 3, requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 5.0])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    loss, _ = grpo_loss(logp, logp.detach(), adv, mask, aggregation="token_sum_norm", length_norm=4)
    assert loss.item() == pytest.approx(-0.25, abs=1e-7)
    loss.backward()
    # every token's gradient is -A / (L * 2 sequences): seq 0 -1/8, seq 1 +1/8, seq 2 none
    expected = torch.tensor([[-0.125, -0.125, -0.125], [0.125, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(logp.grad, expected, atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="length_norm"):
        grpo_loss(logp, logp.detach(), adv, mask, aggregation="token_sum_norm")


def test_dr_grpo_micro_batch_weights_count_sequences():
    # rows with 3, 0 and 1 tokens split [2, 1]: one sequence with tokens in each part -> [1/2, 1/2]
    mask = torch.tensor([[1, 1, 1], [0, 0, 0], [1, 0, 0]])
    assert micro_batch_weights(mask, [2, 1], "token_sum_norm") == [0.5, 0.5]
    # and the weighted micro-batch losses add up to the whole batch's
    logp = torch.log(torch.tensor([[1.1, 0.9, 1.3], [1.0, 1.0, 1.0], [0.7, 1.0, 1.0]]))
    adv = torch.tensor([0.5, 2.0, -1.5])
    whole, _ = grpo_loss(logp, torch.zeros(3, 3), adv, mask, aggregation="token_sum_norm", length_norm=3)
    parts = [grpo_loss(logp[s], torch.zeros(3, 3)[s], adv[s], mask[s], aggregation="token_sum_norm", length_norm=3)[0]
             for s in (slice(0, 2), slice(2, 3))]
    assert whole.item() == pytest.approx(0.5 * parts[0].item() + 0.5 * parts[1].item(), abs=1e-7)
    assert math.isfinite(whole.item())
