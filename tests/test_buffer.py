"""Selective Sample Buffer: sampling maths by hand, and the callback on hand-built Rollouts."""

import io
from types import SimpleNamespace

import pytest
import torch

from lightning_r1v2.callbacks.buffer import SelectiveSampleBuffer, buffer_sample_probs, draw_from_buffer
from lightning_r1v2.rollout.types import Rollouts

G = 4


def make_rollouts(adv, tag=0, completion_len=4, prompt_len=3, lengths=None, group_ids=None, rewards=None):
    """N rows; row i's completion ids are all ``tag * 100 + i`` (so rows can be traced), its
    old_logprobs ``-(tag * 100 + i) / 1000`` and ref_logprobs twice that."""
    adv = torch.tensor(adv, dtype=torch.float32)
    n, c = adv.numel(), completion_len
    uid = torch.arange(n) + 100 * tag  # [N]
    lengths = torch.full((n,), c) if lengths is None else torch.tensor(lengths)
    mask = (torch.arange(c)[None, :] < lengths[:, None]).long()  # [N, C]
    ids = uid[:, None].expand(n, c) * mask + 0 * (1 - mask)
    old = (-uid.float() / 1000)[:, None].expand(n, c) * mask
    return Rollouts(
        prompt_ids=uid[:, None].expand(n, prompt_len).clone() + 1000,
        prompt_mask=torch.ones(n, prompt_len, dtype=torch.long),
        completion_ids=ids.clone(),
        completion_mask=mask,
        media=[{'pixel_values': torch.zeros(1, 3, 4, 4)} for _ in range(n)],
        completions=[f"c{int(u)}" for u in uid],
        records=[{"id": int(u)} for u in uid],
        group_ids=torch.arange(n) // G if group_ids is None else torch.tensor(group_ids),
        group_size=G,
        old_logprobs=old.clone(),
        ref_logprobs=2 * old,
        rewards=rewards if rewards is not None else {"acc": adv.clone()},
        reward=adv.clone(),
        advantages=adv,
    )


def trainer_at(step):
    return SimpleNamespace(global_step=step, callbacks=[], should_stop=False)


def uids(r):
    return r.completion_ids[:, 0].tolist()


EFF = [1.0, -1.0, 0.5, -0.5]  # an effective group
ZERO = [0.0, 0.0, 0.0, 0.0]  # a group whose rewards were all equal


# -- the maths ---------------------------------------------------------------------------------------


def test_probs_by_hand():
    a = torch.tensor([1.0, 3.0])
    # alpha 1: 1/(1+3), 3/(1+3); alpha 2: 1/(1+9), 9/(1+9); alpha 0: uniform
    torch.testing.assert_close(buffer_sample_probs(a, 1.0), torch.tensor([0.25, 0.75]), atol=1e-7, rtol=0)
    torch.testing.assert_close(buffer_sample_probs(a, 2.0), torch.tensor([0.1, 0.9]), atol=1e-7, rtol=0)
    torch.testing.assert_close(buffer_sample_probs(a, 0.0), torch.tensor([0.5, 0.5]), atol=1e-7, rtol=0)
    # 0^1 = 0: a zero |A| is never drawn; alpha 0.5: sqrt(1)=1, sqrt(4)=2 -> 1/3, 2/3
    torch.testing.assert_close(buffer_sample_probs(torch.tensor([0.0, 2.0]), 1.0), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(
        buffer_sample_probs(torch.tensor([1.0, 4.0]), 0.5), torch.tensor([1 / 3, 2 / 3]), atol=1e-7, rtol=0
    )
    # huge |A|^alpha does not overflow (normalised by the max first)
    p = buffer_sample_probs(torch.tensor([1e30, 2e30]), 10.0)
    torch.testing.assert_close(p, torch.tensor([1 / 1025, 1024 / 1025]), atol=1e-7, rtol=0)


@pytest.mark.parametrize(
    "abs_adv, alpha",
    [([], 1.0), ([1.0, -1.0], 1.0), ([1.0, float("nan")], 1.0), ([0.0, 0.0], 1.0), ([1.0], -1.0)],
)
def test_probs_reject_bad_input(abs_adv, alpha):
    with pytest.raises(ValueError):
        buffer_sample_probs(torch.tensor(abs_adv), alpha)


def test_draws_follow_probs():
    g = torch.Generator().manual_seed(0)
    idx = draw_from_buffer(torch.tensor([1.0, 3.0]), 20000, 1.0, g)
    assert idx.dtype == torch.long and idx.shape == (20000,)
    assert abs(idx.float().mean().item() - 0.75) < 0.01  # share of index 1
    idx = draw_from_buffer(torch.tensor([1.0, 3.0]), 20000, 2.0, g)
    assert abs(idx.float().mean().item() - 0.9) < 0.01
    # same generator state, same draws; without replacement n = M is a permutation
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = torch.tensor([0.2, 1.0, 3.0, 0.7])
    assert draw_from_buffer(a, 6, 1.0, g1).tolist() == draw_from_buffer(a, 6, 1.0, g2).tolist()
    assert sorted(draw_from_buffer(a, 4, 1.0, g1, replacement=False).tolist()) == [0, 1, 2, 3]
    assert draw_from_buffer(a, 0, 1.0, g1).numel() == 0


# -- the callback ------------------------------------------------------------------------------------


def test_empty_buffer_leaves_batch_then_replays_into_zero_rows():
    ssb = SelectiveSampleBuffer(capacity=16, max_age=0)
    b1 = make_rollouts(EFF + ZERO, tag=1)
    out1 = ssb.on_advantages(trainer_at(0), None, b1)
    # empty buffer: the batch as is, nothing replayed; its 4 effective rows are stored
    assert uids(out1) == uids(b1) and out1.from_buffer.tolist() == [False] * 8
    assert ssb.last_stats == {
        "ssb/effective_share_before": 0.5,
        "ssb/effective_share_after": 0.5,
        "ssb/buffer_size": 4.0,
        "ssb/replayed_share": 0.0,
        "ssb/evicted_age": 0.0,
        "ssb/evicted_capacity": 0.0,
    }

    b2 = make_rollouts(ZERO + [2.0, -2.0, 1.0, -1.0], tag=2)
    out2 = ssb.on_advantages(trainer_at(1), None, b2)
    assert len(out2) == 8
    # this batch's effective rows first, in order; then 4 replayed rows (buffer holds 4 = needed,
    # so drawn without replacement: each of batch 1's effective rows exactly once)
    assert uids(out2)[:4] == [204, 205, 206, 207]
    assert sorted(uids(out2)[4:]) == [100, 101, 102, 103]
    assert out2.from_buffer.tolist() == [False] * 4 + [True] * 4
    # replayed rows keep their stored advantage, old/ref log-probs and reward columns
    for i in range(4, 8):
        k = uids(out2)[i] - 100
        assert out2.advantages[i].item() == EFF[k]
        torch.testing.assert_close(out2.old_logprobs[i], b1.old_logprobs[k])
        torch.testing.assert_close(out2.ref_logprobs[i], b1.ref_logprobs[k])
        assert out2.rewards["acc"][i].item() == EFF[k] and out2.records[i] == {"id": 100 + k}
        assert out2.completions[i] == f"c{100 + k}"
    # one new negative id for (step 0, group 0), apart from this step's ids
    assert out2.group_ids[:4].tolist() == [1, 1, 1, 1]
    assert out2.group_ids[4:].tolist() == [-1] * 4
    assert ssb.last_stats["ssb/effective_share_before"] == 0.5
    assert ssb.last_stats["ssb/effective_share_after"] == 1.0
    assert ssb.last_stats["ssb/replayed_share"] == 0.5
    assert ssb.last_stats["ssb/buffer_size"] == 8.0  # replayed rows are not stored again


def test_replayed_groups_get_distinct_ids_below_batch_ids():
    ssb = SelectiveSampleBuffer(max_age=0)
    ssb.on_advantages(trainer_at(0), None, make_rollouts(EFF + EFF, tag=1))  # groups 0 and 1
    b = make_rollouts(ZERO * 2, tag=2, group_ids=[-3] * 4 + [5] * 4)
    out = ssb.on_advantages(trainer_at(1), None, b)
    assert out.from_buffer.all()
    ids = out.group_ids.tolist()
    assert max(ids) < -3  # below every id of the batch
    for i, gid in enumerate(ids):  # same original group <-> same new id
        for j, hid in enumerate(ids):
            assert (gid == hid) == ((uids(out)[i] - 100) // 4 == (uids(out)[j] - 100) // 4)


def test_refill_share_half_replaces_half_of_zero_rows():
    ssb = SelectiveSampleBuffer(refill_share=0.5, max_age=0)
    ssb.on_advantages(trainer_at(0), None, make_rollouts(EFF + ZERO, tag=1))
    out = ssb.on_advantages(trainer_at(1), None, make_rollouts(ZERO + EFF, tag=2))
    # 4 zero rows * 0.5 = 2 replaced (the last two), the first two zero rows stay
    assert uids(out)[:6] == [200, 201, 204, 205, 206, 207]
    assert all(100 <= u < 104 for u in uids(out)[6:])
    assert out.from_buffer.tolist() == [False] * 6 + [True] * 2
    assert ssb.last_stats["ssb/replayed_share"] == 0.25
    assert ssb.last_stats["ssb/effective_share_after"] == 0.75
    # refill_share 0.5 of 3 zero rows = 1.5 -> 2 (half up)
    out = ssb.on_advantages(trainer_at(2), None, make_rollouts([0.0, 0.0, 0.0, 1.0], tag=3))
    assert uids(out)[:2] == [300, 303] and out.from_buffer.tolist() == [False, False, True, True]


def test_capacity_evicts_oldest():
    ssb = SelectiveSampleBuffer(capacity=6, max_age=0)
    ssb.on_advantages(trainer_at(0), None, make_rollouts(EFF + ZERO, tag=1))
    ssb.on_advantages(trainer_at(1), None, make_rollouts(EFF + EFF, tag=2))  # no zero rows
    stored = ssb.state_dict()["per_rank"][0]["store"]["completion_ids"][:, 0].tolist()
    assert stored == [202, 203, 204, 205, 206, 207]  # 4 + 8 = 12 > 6: the 6 oldest go
    assert len(ssb) == 6 and ssb.last_stats["ssb/evicted_capacity"] == 6.0


def test_max_age_evicts_old_samples():
    ssb = SelectiveSampleBuffer(max_age=2)
    ssb.on_advantages(trainer_at(10), None, make_rollouts(EFF + ZERO, tag=1))
    out = ssb.on_advantages(trainer_at(12), None, make_rollouts(ZERO, tag=2))  # age 2: kept, replayed
    assert out.from_buffer.all() and ssb.last_stats["ssb/evicted_age"] == 0.0
    b = make_rollouts(ZERO, tag=3)
    out = ssb.on_advantages(trainer_at(13), None, b)  # age 3 > 2: evicted before drawing
    assert uids(out) == uids(b) and not out.from_buffer.any()
    assert ssb.last_stats["ssb/evicted_age"] == 4.0 and len(ssb) == 0


def test_internal_counter_without_trainer():
    ssb = SelectiveSampleBuffer(max_age=1)
    ssb.on_advantages(None, None, make_rollouts(EFF, tag=1))  # step 0
    ssb.on_advantages(None, None, make_rollouts(ZERO, tag=2))  # step 1: age 1, replayed
    out = ssb.on_advantages(None, None, make_rollouts(ZERO, tag=3))  # step 2: age 2 > 1
    assert not out.from_buffer.any() and ssb.last_stats["ssb/evicted_age"] == 4.0


def test_padding_when_lengths_differ():
    module = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=9))  # wins over pad_token_id=0
    ssb = SelectiveSampleBuffer(max_age=0)
    # stored rows: completion width 6 (real lengths 6, 5, 3, 2), prompt width 5
    stored = make_rollouts(EFF, tag=1, completion_len=6, prompt_len=5, lengths=[6, 5, 3, 2])
    ssb.on_advantages(trainer_at(0), module, stored)
    b = make_rollouts(EFF + ZERO, tag=2, completion_len=4, prompt_len=3)
    out = ssb.on_advantages(trainer_at(1), module, b)
    assert out.completion_ids.shape == (8, 6) and out.prompt_ids.shape == (8, 5)
    # this batch's rows: right-padded completions (pad id 9, mask 0, log-probs 0), left-padded prompts
    assert out.completion_ids[0].tolist() == [200] * 4 + [9, 9]
    assert out.completion_mask[0].tolist() == [1, 1, 1, 1, 0, 0]
    assert out.old_logprobs[0, 4:].tolist() == [0.0, 0.0]
    assert out.prompt_ids[0].tolist() == [9, 9, 1200, 1200, 1200]
    assert out.prompt_mask[0].tolist() == [0, 0, 1, 1, 1]
    # replayed rows keep their own lengths
    for i in range(4, 8):
        k = uids(out)[i] - 100
        assert out.completion_mask[i].sum().item() == [6, 5, 3, 2][k]
        torch.testing.assert_close(out.old_logprobs[i], stored.old_logprobs[k])
        assert out.prompt_ids[i].tolist() == stored.prompt_ids[k].tolist()


def test_buffer_trims_unused_padding():
    ssb = SelectiveSampleBuffer(max_age=0)
    b = make_rollouts([1.0, 0, 0, 0], tag=1, completion_len=8, lengths=[3, 8, 8, 8])
    ssb.on_advantages(trainer_at(0), None, b)
    assert ssb.state_dict()["per_rank"][0]["store"]["completion_ids"].shape == (1, 3)


def test_dropped_rows_count_as_zero_and_are_not_stored():
    ssb = SelectiveSampleBuffer(max_age=0)
    b = make_rollouts(EFF, tag=1)
    b.dropped = torch.tensor([False, True, False, False])
    ssb.on_advantages(trainer_at(0), None, b)
    assert ssb.last_stats["ssb/effective_share_before"] == 0.75 and len(ssb) == 3
    assert 101 not in ssb.state_dict()["per_rank"][0]["store"]["completion_ids"][:, 0].tolist()


def test_missing_reward_columns_are_nan_on_replayed_rows():
    ssb = SelectiveSampleBuffer(max_age=0)
    ssb.on_advantages(trainer_at(0), None, make_rollouts(EFF, tag=1))  # rewards: acc only
    b = make_rollouts(ZERO, tag=2, rewards={"acc": torch.zeros(4), "fmt": torch.ones(4)})
    out = ssb.on_advantages(trainer_at(1), None, b)
    assert set(out.rewards) == {"acc", "fmt"} and torch.isnan(out.rewards["fmt"]).all()


def _run(ssb, steps):
    outs = []
    for s in steps:
        tag = s + 1
        adv = ZERO + [0.3 * tag, -0.1, 0.7, -0.9 * tag] if s % 2 == 0 else ZERO * 2
        outs.append(ssb.on_advantages(trainer_at(s), None, make_rollouts(adv, tag=tag)))
    return outs


def test_state_dict_resume_draws_identically():
    kwargs = dict(capacity=6, alpha=1.5, max_age=3, seed=7)
    straight = _run(SelectiveSampleBuffer(**kwargs), range(6))
    first = SelectiveSampleBuffer(**kwargs)
    _run(first, range(3))
    blob = io.BytesIO()
    torch.save(first.state_dict(), blob)  # plain types only: loadable with weights_only=True
    blob.seek(0)
    resumed = SelectiveSampleBuffer(**kwargs)
    resumed.load_state_dict(torch.load(blob, weights_only=True))
    rest = _run(resumed, range(3, 6))
    for a, b in zip(straight[3:], rest):
        assert uids(a) == uids(b)
        assert a.group_ids.tolist() == b.group_ids.tolist()
        torch.testing.assert_close(a.advantages, b.advantages)
    assert any(o.from_buffer.any() for o in rest)  # the comparison did involve draws


def test_clear_every_epoch():
    ssb = SelectiveSampleBuffer(clear_every_epoch=True)
    ssb.on_advantages(trainer_at(0), None, make_rollouts(EFF, tag=1))
    assert len(ssb) == 4
    ssb.on_train_epoch_end(None, None)
    assert len(ssb) == 0


@pytest.mark.parametrize(
    "kwargs",
    [dict(capacity=0), dict(alpha=-1.0), dict(refill_share=1.5), dict(max_age=-1), dict(eps=-1.0)],
)
def test_settings_validated(kwargs):
    with pytest.raises(ValueError):
        SelectiveSampleBuffer(**kwargs)


def test_needs_advantages():
    b = make_rollouts(EFF)
    b.advantages = None
    with pytest.raises(ValueError, match="advantages"):
        SelectiveSampleBuffer().on_advantages(trainer_at(0), None, b)


def test_rows_flagged_as_replayed_are_not_stored_again():
    """A batch that arrives with replayed rows in it (flagged ``from_buffer``) stores only its own
    effective rows: rows 0 and 1 of this group came from the buffer, rows 2 and 3 are new."""
    ssb = SelectiveSampleBuffer(max_age=0)
    b = make_rollouts(EFF, tag=3)
    b.from_buffer = torch.tensor([True, True, False, False])
    ssb.on_advantages(trainer_at(0), None, b)
    assert len(ssb) == 2 and ssb.last_stats["ssb/buffer_size"] == 2.0
    assert sorted(ssb.state_dict()["per_rank"][0]["store"]["completion_ids"][:, 0].tolist()) == [302, 303]


@pytest.mark.parametrize("rank", [0, 1, 3])
def test_each_rank_draws_from_its_own_stream(rank):
    """Rank r seeds its generator with seed + r at fit set-up, so ranks do not replay in lockstep."""
    ssb = SelectiveSampleBuffer(seed=7)
    ssb.setup(SimpleNamespace(global_rank=rank), None, "fit")
    assert torch.equal(ssb.generator.get_state(), torch.Generator().manual_seed(7 + rank).get_state())
    ssb.setup(SimpleNamespace(global_rank=rank), None, "fit")  # a second set-up (validate) keeps the stream going
    draw = torch.rand(3, generator=ssb.generator)
    ssb.setup(SimpleNamespace(global_rank=rank), None, "fit")
    assert not torch.equal(torch.rand(3, generator=ssb.generator), draw)


def test_probs_do_not_overflow_for_a_large_alpha():
    """|A| = [1, 3], alpha 1000: 3^1000 overflows float64, (|A| / max|A|)^alpha does not: P = [3^-1000, 1] = [0, 1]."""
    p = buffer_sample_probs(torch.tensor([1.0, 3.0], dtype=torch.float64), 1000.0)
    assert p.tolist() == [0.0, 1.0]
