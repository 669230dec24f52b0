"""Rollout correction (truncated / masked importance sampling), against hand-worked numbers."""

import math

import pytest
import torch

from lightning_r1v2.losses import grpo_loss, rollout_correction_weights

# Two rows, log-ratios logp_old - logp_rollout per token (column 2 of row 0 is padding):
#   row 0: w = [3, 0.5]        product 1.5
#   row 1: w = [1.25, 1.6, 1.5] product 3.0
ROLLOUT = torch.tensor([[-1.0, -2.0, -7.0], [-0.5, -1.5, -3.0]])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])
RATIOS = torch.tensor([[3.0, 0.5, 1.0], [1.25, 1.6, 1.5]])
TRAINER = ROLLOUT + RATIOS.log()
TRAINER[0, 2] = 50.0  # garbage at padding must not matter
# mean |log w| over the 5 response tokens = ln(3 * 2 * 1.25 * 1.6 * 1.5) / 5 = ln(18) / 5
ABS_MEAN = math.log(18.0) / 5

CASES = {
    # mode, cap_low: weights (C = 2), capped share, weight mean over the 5 tokens
    ("token_truncate", None): ([[2.0, 0.5, 0.0], [1.25, 1.6, 1.5]], 1 / 5, 6.85 / 5),  # 3 -> 2
    ("token_mask", None): ([[0.0, 0.5, 0.0], [1.25, 1.6, 1.5]], 1 / 5, 4.85 / 5),  # 3 -> 0
    ("token_mask", 0.6): ([[0.0, 0.0, 0.0], [1.25, 1.6, 1.5]], 2 / 5, 4.35 / 5),  # and 0.5 < 0.6 -> 0
    # sequence level: one weight per row, the product; share counts rows
    ("sequence_truncate", None): ([[1.5, 1.5, 0.0], [2.0, 2.0, 2.0]], 1 / 2, 9.0 / 5),  # 3 -> 2
    ("sequence_mask", None): ([[1.5, 1.5, 0.0], [0.0, 0.0, 0.0]], 1 / 2, 3.0 / 5),
    ("sequence_mask", 0.5): ([[1.5, 1.5, 0.0], [0.0, 0.0, 0.0]], 1 / 2, 3.0 / 5),  # band [1/C, C]: 1.5 inside
}


@pytest.mark.parametrize("mode,cap_low", list(CASES), ids=[f"{m}-{c}" for m, c in CASES])
def test_weights_by_hand(mode, cap_low):
    weights, share, mean = CASES[(mode, cap_low)]
    w, stats = rollout_correction_weights(TRAINER, ROLLOUT, MASK, mode=mode, cap=2.0, cap_low=cap_low)
    torch.testing.assert_close(w, torch.tensor(weights), atol=1e-6, rtol=0)
    assert stats["rollout_correction/capped_share"].item() == pytest.approx(share, abs=1e-7)
    assert stats["rollout_correction/weight_mean"].item() == pytest.approx(mean, abs=1e-6)
    assert stats["rollout_correction/log_ratio_abs_mean"].item() == pytest.approx(ABS_MEAN, abs=1e-6)


def test_matching_engine_gives_weight_one_and_nothing_capped():
    w, stats = rollout_correction_weights(ROLLOUT, ROLLOUT, MASK, mode="sequence_mask", cap=2.0, cap_low=0.5)
    torch.testing.assert_close(w, MASK.float())
    assert stats["rollout_correction/capped_share"].item() == 0.0
    assert stats["rollout_correction/log_ratio_abs_mean"].item() == 0.0


def test_long_sequence_does_not_overflow():
    # 2000 tokens of log-ratio 1: the product is e^2000 (inf in float32); the weight is the cap
    lp = torch.ones(1, 2000)
    w, stats = rollout_correction_weights(lp, torch.zeros(1, 2000), torch.ones(1, 2000), "sequence_truncate", cap=3.0)
    assert torch.isfinite(w).all() and w.max().item() == pytest.approx(3.0)
    assert stats["rollout_correction/capped_share"].item() == 1.0


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        rollout_correction_weights(TRAINER, ROLLOUT, MASK, mode="token")
    with pytest.raises(ValueError, match="cap must be"):
        rollout_correction_weights(TRAINER, ROLLOUT, MASK, cap=0.0)
    with pytest.raises(ValueError, match="cap_low"):
        rollout_correction_weights(TRAINER, ROLLOUT, MASK, mode="token_mask", cap=2.0, cap_low=2.0)
    with pytest.raises(ValueError, match="same shape"):
        rollout_correction_weights(TRAINER, ROLLOUT[:, :2], MASK)


def test_weights_multiply_the_surrogate_not_the_kl():
    # On-policy (rho = 1), one token each, A = [1, -1], weights [2, 0.5], token mean:
    # L = -(2 * 1 + 0.5 * -1) / 2 = -0.75; dL/dlogp = -w * rho * A / 2 = [-1, 0.25].
    logp = torch.zeros(2, 1, requires_grad=True)
    w = torch.tensor([[2.0], [0.5]])
    loss, _ = grpo_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), torch.ones(2, 1),
                        aggregation="token", token_weights=w)
    assert loss.item() == pytest.approx(-0.75, abs=1e-7)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0], [0.25]]), atol=1e-7, rtol=0)
    # A = 0, KL only (see test_grpo_kl_term_by_hand: 0.025): the weights leave the KL term alone
    lp = torch.tensor([[0.0, math.log(2)]])
    ref = torch.tensor([[math.log(2), 0.0]])
    loss, _ = grpo_loss(lp, lp, torch.zeros(1), torch.ones(1, 2), ref_logprobs=ref, kl_coef=0.1,
                        aggregation="token", token_weights=torch.tensor([[0.0, 3.0]]))
    assert loss.item() == pytest.approx(0.025, abs=1e-7)
