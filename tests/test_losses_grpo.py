"""GRPO advantages, k3 KL and the clipped surrogate, against hand-worked numbers."""

import math
import statistics

import pytest
import torch

from lightning_r1v2.losses import group_advantages, grpo_loss, k3_kl


def test_group_advantages_by_hand():
    # Group 1 [1, 0, 0, 1]: mean 0.5, deviations +-0.5, unbiased var = 4 * 0.25 / 3 = 1/3,
    # std = sqrt(1/3) = 0.5773503, A = +-0.5 / (0.5773503 + 1e-6) = +-0.8660239.
    # Group 2 [1, 1, 1, 1]: all equal -> A = 0 / (0 + eps) = 0.
    adv = group_advantages(torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1]), group_size=4)
    a = 0.8660239037870368
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, a, 0, 0, 0, 0]), atol=1e-6, rtol=0)
    raw = group_advantages(torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1]), group_size=4, scale=False)
    assert raw.tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]


def test_group_advantages_parity_with_loop_reference():
    rewards = torch.tensor([0.3, 2.0, -1.0, 0.5, 0.0, 1.5, 1.5, 4.0, -2.0])
    expected = []
    for i in range(0, 9, 3):
        group = rewards[i : i + 3].tolist()
        mu, sd = statistics.mean(group), statistics.stdev(group)  # stdev: divisor n - 1
        expected += [(r - mu) / (sd + 1e-6) for r in group]
    adv = group_advantages(rewards, 3)
    torch.testing.assert_close(adv, torch.tensor(expected), atol=1e-6, rtol=0)


def test_group_advantages_group_of_one_and_errors():
    assert group_advantages(torch.tensor([3.0, -1.0]), group_size=1).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="divide"):
        group_advantages(torch.ones(6), group_size=4)
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([1.0, float("nan")]), group_size=2)
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([1.0, float("inf")]), group_size=2)


def test_k3_kl_by_hand():
    # d = ref - logp. logp 0, ref ln 2: d = ln 2 -> 2 - ln 2 - 1 = 0.3068528.
    # logp ln 2, ref 0: d = -ln 2 -> 0.5 + ln 2 - 1 = 0.1931472. Equal -> 0.
    lp = torch.tensor([[0.0, math.log(2), -3.0]])
    ref = torch.tensor([[math.log(2), 0.0, -3.0]])
    expected = torch.tensor([[0.3068528194400546, 0.1931471805599454, 0.0]])
    torch.testing.assert_close(k3_kl(lp, ref), expected, atol=1e-7, rtol=0)


def _one_token_batch():
    # One token per sequence, clip 0.2 (band [0.8, 1.2]):
    # 0: A=+1, rho=1.5 -> min(1.5, 1.2) = 1.2   clipped (high)     loss -1.2
    # 1: A=-1, rho=1.5 -> min(-1.5, -1.2) = -1.5 unclipped          loss +1.5
    # 2: A=-1, rho=0.5 -> min(-0.5, -0.8) = -0.8 clipped (low)       loss +0.8
    # 3: A=+2, rho=1.1 -> min(2.2, 2.2) = 2.2    inside the band     loss -2.2
    # mean = (-1.2 + 1.5 + 0.8 - 2.2) / 4 = -0.275; clip fraction 2/4; ratio mean 4.6/4 = 1.15
    old = torch.zeros(4, 1)
    logp = torch.log(torch.tensor([[1.5], [1.5], [0.5], [1.1]])).requires_grad_()
    return logp, old, torch.tensor([1.0, -1.0, -1.0, 2.0]), torch.ones(4, 1)


def test_grpo_loss_clip_branches_by_hand():
    logp, old, adv, mask = _one_token_batch()
    loss, stats = grpo_loss(logp, old, adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-0.275, abs=1e-6)
    assert stats["clip_fraction"].item() == pytest.approx(0.5)
    assert stats["clip_ratio/low_mean"].item() == pytest.approx(0.25)
    assert stats["clip_ratio/high_mean"].item() == pytest.approx(0.25)
    assert stats["ratio_mean"].item() == pytest.approx(1.15, abs=1e-6)
    assert stats["kl"].item() == 0.0
    assert all(not v.requires_grad for v in stats.values())
    loss.backward()
    # d/dlogp of -rho*A/4 is -rho*A/4 where unclipped; 0 in the clipped branch.
    # 0: 0; 1: 1.5/4 = 0.375; 2: 0; 3: -1.1*2/4 = -0.55
    expected_grad = torch.tensor([[0.0], [0.375], [0.0], [-0.55]])
    torch.testing.assert_close(logp.grad, expected_grad, atol=1e-6, rtol=0)


def test_grpo_loss_clip_higher():
    # eps_high 0.6 (band [0.8, 1.6]): sequence 0 is now inside, loss -1.5 instead of -1.2:
    # (-1.5 + 1.5 + 0.8 - 2.2) / 4 = -0.35; only the low clip remains.
    logp, old, adv, mask = _one_token_batch()
    loss, stats = grpo_loss(logp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.6)
    assert loss.item() == pytest.approx(-0.35, abs=1e-6)
    assert stats["clip_ratio/high_mean"].item() == 0.0
    assert stats["clip_fraction"].item() == pytest.approx(0.25)


def test_grpo_sequence_vs_token_aggregation():
    # On-policy (rho = 1), so per-token loss = -A. Seq 0: A=+1, 3 tokens; seq 1: A=-1, 1 token;
    # seq 2: A=5 but no masked tokens (excluded, no NaN).
    # sequence: mean(-1, +1) = 0. token: (3 * -1 + 1 * 1) / 4 = -0.5.
    logp = torch.zeros(3, 3, requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 5.0])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    seq, _ = grpo_loss(logp, logp.detach(), adv, mask, aggregation="sequence")
    tok, _ = grpo_loss(logp, logp.detach(), adv, mask, aggregation="token")
    assert seq.item() == pytest.approx(0.0, abs=1e-7)
    assert tok.item() == pytest.approx(-0.5, abs=1e-7)
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(logp, logp.detach(), adv, mask, aggregation="mean")


def test_grpo_kl_term_by_hand():
    # A = 0 so only the KL term is left. Tokens: k3 = 0.3068528 and 0.1931472 (see k3 test),
    # token aggregation, coef 0.1: 0.1 * (0.3068528 + 0.1931472) / 2 = 0.025.
    logp = torch.tensor([[0.0, math.log(2)]], requires_grad=True)
    ref = torch.tensor([[math.log(2), 0.0]])
    adv, mask = torch.zeros(1), torch.ones(1, 2)
    loss, stats = grpo_loss(
        logp, logp.detach(), adv, mask, ref_logprobs=ref, kl_coef=0.1, aggregation="token"
    )
    assert loss.item() == pytest.approx(0.025, abs=1e-7)
    assert stats["kl"].item() == pytest.approx(0.25, abs=1e-7)
    _, stats0 = grpo_loss(logp, logp.detach(), adv, mask, ref_logprobs=ref)
    assert stats0["kl"].item() == pytest.approx(0.25, abs=1e-7)  # logged even when coef is 0
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(logp, logp.detach(), adv, mask, kl_coef=0.1)


def test_grpo_loss_parity_with_loop_reference():
    g = torch.Generator().manual_seed(0)
    n, t, eps, eps_hi, coef = 5, 6, 0.2, 0.28, 0.05
    logp = (torch.randn(n, t, generator=g) * 0.3 - 1).requires_grad_()
    old = logp.detach() + torch.randn(n, t, generator=g) * 0.3
    ref = logp.detach() + torch.randn(n, t, generator=g) * 0.2
    adv = torch.randn(n, generator=g)
    mask = (torch.rand(n, t, generator=g) > 0.3).float()
    mask[2] = 0
    per_seq, all_tok = [], []
    for i in range(n):
        terms = []
        for j in range(t):
            if mask[i, j] == 0:
                continue
            rho = math.exp(logp[i, j].item() - old[i, j].item())
            a = adv[i].item()
            surr = min(rho * a, min(max(rho, 1 - eps), 1 + eps_hi) * a)
            d = ref[i, j].item() - logp[i, j].item()
            terms.append(-surr + coef * (math.exp(d) - d - 1))
        all_tok += terms
        if terms:
            per_seq.append(sum(terms) / len(terms))
    expected = {"sequence": sum(per_seq) / len(per_seq), "token": sum(all_tok) / len(all_tok)}
    for agg in ("sequence", "token"):
        loss, _ = grpo_loss(logp, old, adv, mask, eps, eps_hi, ref, coef, agg)
        assert loss.item() == pytest.approx(expected[agg], abs=1e-6)


def test_grpo_padding_garbage_does_not_poison_gradients():
    # Padded positions hold wild log-probs (exp(200) overflows float32); they must not matter.
    logp = torch.tensor([[-1.0, 100.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -100.0]])
    ref = torch.tensor([[-1.0, -100.0]])
    mask = torch.tensor([[1, 0]])
    loss, stats = grpo_loss(logp, old, torch.ones(1), mask, ref_logprobs=ref, kl_coef=0.1)
    loss.backward()
    assert loss.item() == pytest.approx(-1.0, abs=1e-6)
    assert torch.isfinite(logp.grad).all() and torch.isfinite(stats["ratio_mean"])


def test_clip_ratios_count_only_tokens_where_the_clip_binds():
    """Out of the band is not enough: the clipped term must be the one min() picks.
    0: A=+1, rho=0.5 -> min(0.5, 0.8) = 0.5 unclipped (below the band, but A > 0)
    1: A=-1, rho=1.5 -> min(-1.5, -1.2) = -1.5 unclipped (above the band, but A < 0)
    2: A=-1, rho=0.5 -> min(-0.5, -0.8) = -0.8 clipped (low)
    low 1/3, high 0, clip fraction 1/3."""
    logp = torch.log(torch.tensor([[0.5], [1.5], [0.5]]))
    _, stats = grpo_loss(logp, torch.zeros(3, 1), torch.tensor([1.0, -1.0, -1.0]), torch.ones(3, 1), clip_eps=0.2)
    assert stats["clip_ratio/low_mean"].item() == pytest.approx(1 / 3)
    assert stats["clip_ratio/high_mean"].item() == 0.0
    assert stats["clip_fraction"].item() == pytest.approx(1 / 3)
