"""The high-entropy token mask ("Beyond the 80/20 rule"), against hand-worked numbers."""

import math

import pytest
import torch

from lightning_r1v2.losses import grpo_loss, high_entropy_mask

# response entropies {0.1, 2.0, 0.5, 1.3, 0.9}; 9.9 and 7.0 sit at padding and must be ignored
ENTROPY = torch.tensor([[0.1, 2.0, 0.5, 9.9], [1.3, 0.9, 7.0, 7.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def test_quantile_threshold_by_hand():
    # sorted [0.1, 0.5, 0.9, 1.3, 2.0], top 40%: p = 0.6 * 4 = 2.4, tau = 0.9 + 0.4 * (1.3 - 0.9) = 1.06
    keep, tau = high_entropy_mask(ENTROPY, MASK, 0.4)
    assert tau.item() == pytest.approx(1.06, abs=1e-6)
    assert keep.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]
    # top 20%: p = 0.8 * 4 = 3.2, tau = 1.3 + 0.2 * (2.0 - 1.3) = 1.44: only 2.0
    keep, tau = high_entropy_mask(ENTROPY, MASK, 0.2)
    assert tau.item() == pytest.approx(1.44, abs=1e-6)
    assert keep.tolist() == [[0, 1, 0, 0], [0, 0, 0, 0]]
    # 1.0 keeps every response token, never padding
    keep, tau = high_entropy_mask(ENTROPY, MASK, 1.0)
    assert keep.tolist() == MASK.float().tolist() and tau.item() == pytest.approx(0.1)


def test_ties_at_the_threshold_are_kept():
    keep, tau = high_entropy_mask(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), torch.ones(1, 4), 0.25)
    # p = 0.75 * 3 = 2.25 over [0, 1, 1, 1]: tau = 1.0, so all three 1.0 tokens are kept (75%)
    assert tau.item() == 1.0 and keep.tolist() == [[1, 1, 1, 0]]


def test_only_kept_tokens_carry_gradient_denominator_unchanged():
    # On-policy, per-token loss -A, A = [1, 2], token mean over all 5 response tokens; top 40% keeps
    # row 0 col 1 and row 1 col 0: L = (-1 - 2) / 5 = -0.6; grads -A / 5 there, 0 elsewhere
    keep, _ = high_entropy_mask(ENTROPY, MASK, 0.4)
    logp = torch.zeros(2, 4, requires_grad=True)
    loss, _ = grpo_loss(logp, logp.detach(), torch.tensor([1.0, 2.0]), MASK, aggregation="token", token_weights=keep)
    assert loss.item() == pytest.approx(-0.6, abs=1e-7)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.2, 0.0, 0.0], [-0.4, 0.0, 0.0, 0.0]]), atol=1e-7, rtol=0)


def test_empty_batch_and_bad_share():
    keep, tau = high_entropy_mask(ENTROPY, torch.zeros(2, 4), 0.2)
    assert keep.sum().item() == 0 and tau.item() == -math.inf
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            high_entropy_mask(ENTROPY, MASK, bad)
    with pytest.raises(ValueError, match="same shape"):
        high_entropy_mask(ENTROPY, MASK[:, :2], 0.2)
