"""GRPO options on a tiny model: rollout correction, GSPO / Dr. GRPO / high-entropy settings, and
DAPO's dynamic sampling (the batch the loss sees has no zero-variance group; extra rollouts logged)."""
import math

import lightning as L
import pytest
import torch

from lightning_r1v2.callbacks import DynamicSampling, RolloutHooks
from lightning_r1v2.callbacks.dynamic_sampling import groups_with_spread
from lightning_r1v2.data.datamodule import R1V2DataModule
from lightning_r1v2.modules import GRPOModule
from lightning_r1v2.rewards import RewardCallback
from lightning_r1v2.rollout import HFGenerateEngine


class _ShiftedEngine(HFGenerateEngine):
    """Records log-probs ln 3 above the true ones: a mismatched engine, w = pi_trainer / pi_engine = 1/3."""

    def generate(self, module, batch, group_size):
        r = super().generate(module, batch, group_size)
        r.old_logprobs = r.old_logprobs + math.log(3.0) * r.completion_mask
        return r


def _length_parity(completions, **_):
    """1.0 for an odd number of characters: a reward with spread in some groups and none in others."""
    return [float(len(c) % 2) for c in completions]


def _fit(module, tiny_data, tmp_path, callbacks, steps=1, batch_size=2):
    dm = R1V2DataModule(train_file=str(tiny_data / "train.jsonl"), val_file=None, kind="prompts", batch_size=batch_size)
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=L.pytorch.loggers.CSVLogger(tmp_path, name="logs"),
        enable_checkpointing=False, log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[RewardCallback(_length_parity, name="parity", weight=1.0), *callbacks],
    )
    trainer.fit(module, dm)
    return trainer


@pytest.mark.parametrize("mode,cap_low,share,loss_zero", [
    ("token_mask", 0.5, 1.0, True),        # w = 1/3 < 0.5 on every token: all masked, the surrogate is 0
    ("token_truncate", None, 0.0, False),  # w = 1/3 < C = 2: nothing truncated, the loss is scaled by 1/3
])
def test_rollout_correction_sees_the_engine_mismatch(tiny_data, tmp_path, mode, cap_low, share, loss_zero):
    torch.manual_seed(0)
    m = GRPOModule(engine=_ShiftedEngine(max_new_tokens=8, temperature=1.3), group_size=4, lr=1e-3,
                   rollout_correction=mode, rollout_correction_cap=2.0, rollout_correction_cap_low=cap_low)
    metrics = _fit(m, tiny_data, tmp_path, []).logged_metrics
    # the trainer's no-grad forward matches the engine's sampling pass within 1e-4 (test_grpo_module),
    # so the mean |log ratio| is the injected ln 3
    assert float(metrics["rollout_correction/log_ratio_abs_mean"]) == pytest.approx(math.log(3.0), abs=1e-3)
    assert float(metrics["rollout_correction/capped_share"]) == share
    expected_w = 0.0 if loss_zero else 1.0 / 3.0
    assert float(metrics["rollout_correction/weight_mean"]) == pytest.approx(expected_w, abs=1e-3)
    assert (float(metrics["loss"]) == 0.0) == loss_zero


def test_rollout_correction_needs_recorded_logprobs(tiny_data, tmp_path):
    m = GRPOModule(engine=HFGenerateEngine(max_new_tokens=8, record_logprobs=False), group_size=2, lr=1e-3,
                   rollout_correction="sequence_truncate")
    with pytest.raises(ValueError, match="recorded none"):
        _fit(m, tiny_data, tmp_path, [])


def test_gspo_dr_grpo_and_high_entropy_settings_run_and_log(tiny_data, tmp_path):
    torch.manual_seed(0)
    m = GRPOModule(engine=HFGenerateEngine(max_new_tokens=8, temperature=1.3), group_size=4, lr=1e-3,
                   importance_level="sequence", aggregation="token_sum_norm", entropy_quantile=0.2,
                   clip_eps=3e-4, clip_eps_high=4e-4)
    metrics = _fit(m, tiny_data, tmp_path, []).logged_metrics
    assert math.isfinite(float(metrics["loss"]))
    assert float(metrics["entropy/quantile_threshold"]) > 0  # the top-20% entropy cut of a random policy
    for bad in ({"importance_level": "group"}, {"entropy_quantile": 0.0}, {"rollout_correction": "token"},
                {"aggregation": "dr_grpo"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GRPOModule(group_size=2, **bad)


class _LossBatchSpy(RolloutHooks):
    """Listed after DynamicSampling: sees the batch the loss sees."""

    def __init__(self):
        self.batches = []

    def on_advantages(self, trainer, pl_module, rollouts):
        self.batches.append(rollouts)


def test_groups_with_spread_by_hand():
    # groups [0, 0 | 1, 1 | 2, 2]: rewards [1, 1 | 0, 1 | 0, 0.5] with row 5 dropped
    ids, spread, rows = groups_with_spread(torch.tensor([1.0, 1, 0, 1, 0, 0.5]), torch.tensor([0, 0, 1, 1, 2, 2]),
                                           torch.tensor([False, False, False, False, False, True]))
    assert ids == [0, 1, 2] and spread == [False, True, False]
    assert [r.tolist() for r in rows] == [[0, 1], [2, 3], [4, 5]]


def test_dynamic_sampling_gives_the_loss_no_zero_variance_group(tiny_data, tmp_path):
    torch.manual_seed(0)
    G, B, steps = 2, 4, 3  # G = 2: half of the groups have equal rewards under the parity reward
    m = GRPOModule(engine=HFGenerateEngine(max_new_tokens=8, temperature=1.3), group_size=G, lr=1e-3,
                   aggregation="token", clip_eps_high=0.28)
    ds, spy = DynamicSampling(max_extra_prompts=32, seed=0), _LossBatchSpy()  # rounds: the missing groups
    stats = []

    class _Stats(RolloutHooks):
        def on_advantages(self, trainer, pl_module, rollouts):
            stats.append(dict(ds.last_stats))

    trainer = _fit(m, tiny_data, tmp_path, [ds, spy, _Stats()], steps=steps, batch_size=B)
    assert len(spy.batches) == steps
    for r in spy.batches:
        assert len(r) == B * G and r.num_groups == B  # the batch size is kept
        _, spread, _ = groups_with_spread(r.reward, r.group_ids, r.dropped)
        assert all(spread), "the loss saw a group with zero reward spread"
        assert (r.advantages.abs() > 1e-6).all()
    # the sampled batches did hold zero-variance groups, and replacing them cost logged extra rollouts
    assert sum(s["dynamic_sampling/zero_std_share_before"] for s in stats) > 0
    extra = [s["dynamic_sampling/extra_rollouts"] for s in stats]
    assert sum(extra) > 0 and all(e % G == 0 for e in extra)
    for s in stats:  # a step short of m groups samples at least m prompts; a full one samples none
        missing = round(s["dynamic_sampling/zero_std_share_before"] * B)
        assert s["dynamic_sampling/extra_rollouts"] >= missing * G
        assert (s["dynamic_sampling/rounds"] == 0) == (missing == 0)
    assert stats[-1]["dynamic_sampling/extra_rollouts_total"] == sum(extra) == ds.extra_rollouts_total
    assert all(s["dynamic_sampling/zero_std_share_after"] == 0.0 for s in stats)
    metrics = trainer.logged_metrics
    assert float(metrics["dynamic_sampling/extra_rollouts_total"]) == sum(extra)
    # the module's effective_share is that of the batch as sampled: with G = 2 and 0/1 rewards, a group
    # with spread has both advantages non-zero, so it is 1 - the callback's zero-std share before
    assert float(metrics["effective_share"]) == pytest.approx(1.0 - stats[-1]["dynamic_sampling/zero_std_share_before"])
    assert ds.state_dict()["pos"] > 0


def test_dynamic_sampling_cap_keeps_the_batch_size(tiny_data, tmp_path):
    # no extra prompts allowed: the batch passes through unchanged in size, zero-variance groups included
    torch.manual_seed(0)
    m = GRPOModule(engine=HFGenerateEngine(max_new_tokens=8, temperature=1.3), group_size=2, lr=1e-3)
    ds, spy = DynamicSampling(max_extra_prompts=0), _LossBatchSpy()
    _fit(m, tiny_data, tmp_path, [ds, spy], steps=2, batch_size=4)
    for r in spy.batches:
        assert len(r) == 8
    assert ds.extra_rollouts_total == 0
    assert ds.last_stats["dynamic_sampling/zero_std_share_after"] == ds.last_stats["dynamic_sampling/zero_std_share_before"]


class _Trainer:
    """Just what DynamicSampling reads to draw prompts."""

    class datamodule:  # noqa: N801
        train_records = [{"id": i} for i in range(5)]


def test_dynamic_sampling_prompt_stream_resumes_exactly():
    a = DynamicSampling(seed=3)
    first = [r["id"] for r in a._draw(_Trainer, 3)]
    state = a.state_dict()
    rest = [r["id"] for r in a._draw(_Trainer, 4)]  # 2 left in the first permutation, then a new one
    b = DynamicSampling(seed=3)
    b.load_state_dict(state)
    assert [r["id"] for r in b._draw(_Trainer, 4)] == rest
    assert sorted(first + rest[:2]) == [0, 1, 2, 3, 4]  # a whole permutation before any repeat
    assert b.state_dict() == {"pass": 1, "pos": 2, "extra_rollouts_total": 0}
    with pytest.raises(ValueError, match="training records"):
        DynamicSampling()._draw(object(), 1)


@pytest.mark.parametrize("overlay,expected", [
    ("grpo_dapo", ["class_path: lightning_r1v2.callbacks.DynamicSampling", "clip_eps_high: 0.28", "aggregation: token\n"]),
    ("grpo_gspo", ["importance_level: sequence", "clip_eps: 0.0003"]),
    ("grpo_dr_grpo", ["scale_advantages: false", "aggregation: token_sum_norm"]),
    ("grpo_high_entropy", ["entropy_quantile: 0.2"]),
    ("grpo_tis", ["rollout_correction: token_truncate", "rollout_correction_cap: 2.0"]),
])
def test_overlay_configs_set_their_option(overlay, expected, capsys):
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    import cli

    with pytest.raises(SystemExit):
        cli.main(["fit", "--config", str(root / "configs/tiny/grpo.yaml"),
                  "--config", str(root / f"configs/tiny/{overlay}.yaml"), "--print_config"])
    out = capsys.readouterr().out
    for line in expected:
        assert line in out, (overlay, line)


def test_dynamic_sampling_then_the_buffer_on_one_run(tiny_data, tmp_path):
    # both listed, DynamicSampling first: the buffer receives full batches with spread in every group
    # (nothing to replace), and still stores their effective rows
    from lightning_r1v2.callbacks import SelectiveSampleBuffer

    torch.manual_seed(0)
    m = GRPOModule(engine=HFGenerateEngine(max_new_tokens=8, temperature=1.3), group_size=2, lr=1e-3)
    ds, ssb, spy = DynamicSampling(max_extra_prompts=32), SelectiveSampleBuffer(capacity=64), _LossBatchSpy()
    _fit(m, tiny_data, tmp_path, [ds, ssb, spy], steps=2, batch_size=4)
    assert len(spy.batches) == 2 and all(len(r) == 8 for r in spy.batches)
    assert ssb.last_stats["ssb/effective_share_before"] == 1.0 and ssb.last_stats["ssb/replayed_share"] == 0.0
    assert len(ssb) == 16  # 2 steps x 8 effective rows
    assert ds.extra_rollouts_total > 0


def test_critical_token_entropy_is_logged_every_step_from_the_steps_own_tokens(tiny_data, tmp_path):
    """R1V3's signal on the step's own samples: the mean entropy where the sampled token is a critical
    one ("Wait", "But", "Let", ...), recomputed here from the rollouts (lr 0: the policy is unchanged)."""
    from lightning_r1v2.callbacks.entropy import CRITICAL_TOKENS, critical_token_ids


    L.seed_everything(0)
    m = GRPOModule(group_size=4, lr=0.0, engine=HFGenerateEngine(max_new_tokens=16), table_every_n_steps=0)
    crit, _ = critical_token_ids(m.tokenizer, list(CRITICAL_TOKENS))
    with torch.no_grad():  # make critical tokens likely, so the random policy samples some
        for t in crit:
            m.model.lm_head.weight[t] *= 3.0
    dm = R1V2DataModule(train_file=str(tiny_data / "train.jsonl"), val_file=None, kind="prompts", batch_size=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        callbacks=[RewardCallback(lambda completions, **k: [float(len(c) % 3) for c in completions],
                                                  name="spread")], default_root_dir=tmp_path)
    trainer.fit(m, dm)
    r = m.last_rollouts
    m.model.eval()
    with torch.no_grad():
        _, ent = m.sequence_logprobs(m.model, r, with_entropy=True)
    at = torch.isin(r.completion_ids, torch.tensor(sorted(crit))) & r.completion_mask.bool()
    assert at.sum() > 0
    got = trainer.callback_metrics
    assert float(got["entropy/critical_step_count"]) == int(at.sum())
    assert float(got["entropy/critical_step_mean"]) == pytest.approx(float(ent[at].mean()), abs=1e-4)
