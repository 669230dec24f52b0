"""SFT loss and the shared helpers, against hand-worked numbers and torch references."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_r1v2.losses import (
    entropy_from_logits,
    masked_mean,
    sft_loss,
    shift_for_causal_lm,
    token_logprobs,
)


def test_sft_loss_two_tokens_by_hand():
    # V = 3. Token 1: logits [0, 0, 0], label 2 -> p = 1/3, NLL = ln 3 = 1.0986123.
    # Token 2: logits [ln 2, 0, 0], label 0 -> p = 2 / (2 + 1 + 1) = 1/2, NLL = ln 2 = 0.6931472.
    # Token 3 is ignored (-100). Mean over the 2 targets = (ln 3 + ln 2) / 2 = 0.8958797.
    logits = torch.tensor([[[0.0, 0.0, 0.0], [math.log(2), 0.0, 0.0], [5.0, -3.0, 1.0]]])
    labels = torch.tensor([[2, 0, -100]])
    loss, stats = sft_loss(logits, labels)
    assert loss.item() == pytest.approx(0.8958797346140275, abs=1e-6)
    assert stats["tokens"].item() == 2
    assert stats["loss"].item() == pytest.approx(loss.item())
    assert not stats["loss"].requires_grad


def test_sft_loss_matches_torch_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3] = -100
    labels[2, 5:] = -100
    loss, stats = sft_loss(logits, labels)
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=0)
    assert stats["tokens"].item() == int((labels != -100).sum())
    (g_ours,) = torch.autograd.grad(loss, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-7, rtol=0)


def test_sft_loss_custom_ignore_index_and_all_ignored():
    logits = torch.zeros(1, 2, 4, requires_grad=True)
    # ignore_index=3: only the first token counts, uniform over 4 -> ln 4 = 1.3862944.
    loss, _ = sft_loss(logits, torch.tensor([[1, 3]]), ignore_index=3)
    assert loss.item() == pytest.approx(math.log(4), abs=1e-6)
    loss, stats = sft_loss(logits, torch.full((1, 2), -100))
    assert loss.item() == 0.0 and stats["tokens"].item() == 0
    loss.backward()  # no NaN, graph intact
    assert torch.isfinite(logits.grad).all()


def test_shift_for_causal_lm():
    logits = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, 8, -100]])
    s_logits, s_labels = shift_for_causal_lm(logits, labels)
    assert s_logits.shape == (2, 3, 3) and s_labels.shape == (2, 3)
    torch.testing.assert_close(s_logits, logits[:, :3])
    assert s_labels.tolist() == [[-100, 5, 6], [7, 8, -100]]


def test_token_logprobs_matches_log_softmax_and_bf16_runs_in_fp32():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 9, generator=g) * 4
    labels = torch.randint(0, 9, (2, 5), generator=g)
    ref = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, labels), ref, atol=1e-6, rtol=0)
    out = token_logprobs(logits.bfloat16(), labels)
    assert out.dtype == torch.float32 and out.shape == (2, 5)
    ref_bf16 = torch.log_softmax(logits.bfloat16().float(), -1).gather(-1, labels[..., None])
    torch.testing.assert_close(out, ref_bf16.squeeze(-1), atol=1e-6, rtol=0)
    # -100 is read as index 0
    labels[0, 0] = -100
    assert token_logprobs(logits, labels)[0, 0].item() == pytest.approx(
        torch.log_softmax(logits[0, 0], -1)[0].item(), abs=1e-6
    )


def test_entropy_from_logits():
    # Uniform over 4 -> ln 4 = 1.3862944; one-hot-like (logit 100 vs 0) -> ~0.
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]], dtype=torch.bfloat16)
    ent = entropy_from_logits(logits)
    assert ent.dtype == torch.float32
    assert ent[0, 0].item() == pytest.approx(math.log(4), abs=1e-6)
    assert ent[0, 1].item() == pytest.approx(0.0, abs=1e-6)
    rand = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(2))
    ref = torch.distributions.Categorical(logits=rand).entropy()
    torch.testing.assert_close(entropy_from_logits(rand), ref, atol=1e-6, rtol=0)


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, float("inf")], [4.0, float("nan"), 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    # (1 + 2) / 2 = 1.5; the inf/NaN at masked positions never enter.
    assert masked_mean(x, mask).item() == pytest.approx(1.5)
    assert masked_mean(x, mask, dim=1).tolist() == [1.5, 0.0]
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0
    assert masked_mean(x, mask.bool(), dim=-1).tolist() == [1.5, 0.0]


def test_entropy_ignores_masked_out_tokens():
    import math

    import torch

    from lightning_r1v2.losses import entropy_from_logits

    # two allowed tokens with equal logits, two masked with -inf: H = ln 2 (not NaN)
    logits = torch.tensor([[[0.0, 0.0, float("-inf"), float("-inf")]]])
    assert abs(float(entropy_from_logits(logits)[0, 0]) - math.log(2)) < 1e-6


def test_chunked_logprobs_and_entropy_equal_the_one_chunk_result():
    from lightning_r1v2.losses.common import _row_chunks

    torch.manual_seed(0)
    logits = torch.randn(5, 3, 7, requires_grad=True)
    logits_masked = logits.detach().clone()
    logits_masked[..., 2] = float("-inf")
    labels = torch.randint(0, 7, (5, 3))
    # 21 logits per row: a budget of 50 holds 2 rows per chunk -> rows [0:2], [2:4], [4:5]
    assert [(s.start, s.stop) for s in _row_chunks(logits, 50)] == [(0, 2), (2, 4), (4, 5)]
    assert [(s.start, s.stop) for s in _row_chunks(logits, 1)] == [(i, i + 1) for i in range(5)]
    whole = token_logprobs(logits, labels)
    chunked = token_logprobs(logits, labels, max_elements=50)
    torch.testing.assert_close(chunked, whole, atol=0, rtol=0)
    ref = torch.log_softmax(logits.detach(), -1).gather(-1, labels[..., None]).squeeze(-1)  # plain formula
    torch.testing.assert_close(chunked.detach(), ref, atol=1e-6, rtol=0)
    g_whole, = torch.autograd.grad(whole.sum(), logits)
    g_chunked, = torch.autograd.grad(chunked.sum(), logits)
    torch.testing.assert_close(g_chunked, g_whole)
    p = torch.softmax(logits_masked, -1)
    ref_h = -(torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))).sum(-1)  # H = -sum p log p
    torch.testing.assert_close(entropy_from_logits(logits_masked, max_elements=21), ref_h, atol=1e-5, rtol=0)
    assert token_logprobs(torch.zeros(0, 3, 7), torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3)
