"""GRPO module plumbing: behaviour log-probs, hooks, metrics, tables, errors."""
import math
import zlib

import lightning as L
import pytest
import torch

from lightning_r1v2.callbacks.hooks import RolloutHooks
from lightning_r1v2.data.collate import PromptCollator
from lightning_r1v2.data.datamodule import R1V2DataModule
from lightning_r1v2.data.records import read_records
from lightning_r1v2.modules import GRPOModule
from lightning_r1v2.rewards import RewardCallback, accuracy_reward, format_reward
from lightning_r1v2.rollout import HFGenerateEngine


def _module(**kw):
    return GRPOModule(engine=HFGenerateEngine(max_new_tokens=8, temperature=1.3), group_size=4, lr=1e-3, **kw)


def test_engine_logprobs_equal_a_fresh_forward(tiny_data, make_eos_likely):
    torch.manual_seed(0)
    m = _module()
    records, _ = read_records(tiny_data / "val.jsonl")
    make_eos_likely(m, records[:3])  # else no 8-token sample of the random policy holds an EOS
    batch = PromptCollator(m.processor)(records[:3])
    r = m.engine.generate(m, batch, group_size=4)
    assert len(r) == 12 and r.group_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert r.completion_ids.shape[1] <= 8 and len(r.completions) == 12
    m.model.eval()
    with torch.no_grad():
        logp, _ = m.sequence_logprobs(m.model, r)
    mask = r.completion_mask.bool()
    # the sampling pass and the training forward agree: ratio exp(logp - old) is 1
    assert torch.allclose(logp[mask], r.old_logprobs[mask], atol=1e-4)
    # completion mask: 1 up to and including the first EOS, 0 after; rows without one are truncated
    eos = m.tokenizer.eos_token_id
    ended = 0
    for row, msk, cut in zip(r.completion_ids, r.completion_mask, r.truncated):
        hits = (row == eos).nonzero().flatten()
        if len(hits):
            first = int(hits[0])
            ended += first < len(row) - 1
            assert msk[: first + 1].all() and not msk[first + 1 :].any() and not cut
        else:
            assert msk.all() and cut
    assert ended >= 2  # the check did see rows that end early


class _Spy(RolloutHooks):
    def __init__(self):
        self.calls = []

    def on_rollouts(self, trainer, pl_module, rollouts):
        self.calls.append("rollouts")

    def on_rewards(self, trainer, pl_module, rollouts):
        assert set(rollouts.rewards) == {"accuracy", "format", "parity"}
        self.calls.append("rewards")

    def on_advantages(self, trainer, pl_module, rollouts):
        assert rollouts.advantages is not None
        self.calls.append("advantages")


def parity_reward(completions, **kwargs):
    """crc32 of the text mod 2: a fixed reward that varies inside a group (a random policy's accuracy is mostly 0)."""
    return [float(zlib.crc32(c.encode()) % 2) for c in completions]


def test_fit_two_steps_updates_weights_and_logs(tiny_data, tmp_path):
    torch.manual_seed(0)
    m = _module(table_every_n_steps=1)
    spy = _Spy()
    dm = R1V2DataModule(train_file=str(tiny_data / "train.jsonl"), val_file=None, kind="prompts", batch_size=2)
    before = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="logs")
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=logger, enable_checkpointing=False, log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[RewardCallback(accuracy_reward, name="accuracy", weight=0.8),
                   RewardCallback(format_reward, name="format", weight=0.2),
                   RewardCallback(parity_reward, name="parity", weight=0.5), spy],
    )
    trainer.fit(m, dm)
    assert spy.calls == ["rollouts", "rewards", "advantages"] * 2
    metrics = {k: float(v) for k, v in trainer.logged_metrics.items()}
    # the last step's metrics, recomputed from the rollouts it trained on
    r = m.last_rollouts
    answers, choices = [x["answer"] for x in r.records], [x.get("choices") for x in r.records]
    acc = torch.tensor(accuracy_reward(r.completions, answer=answers, choices=choices))
    fmt = torch.tensor(format_reward(r.completions))
    par = torch.tensor(parity_reward(r.completions))
    reward = 0.8 * acc + 0.2 * fmt + 0.5 * par
    lengths = r.completion_mask.sum(1).float()
    assert metrics["rewards/accuracy/mean"] == pytest.approx(float(acc.mean()), abs=1e-6)
    assert metrics["rewards/format/mean"] == pytest.approx(float(fmt.mean()), abs=1e-6)
    assert metrics["rewards/parity/mean"] == pytest.approx(float(par.mean()), abs=1e-6)
    assert metrics["reward"] == pytest.approx(float(reward.mean()), abs=1e-6)
    assert metrics["reward_std"] == pytest.approx(float(reward.std()), abs=1e-6)
    grouped = reward.view(-1, 4)
    assert metrics["frac_reward_zero_std"] == pytest.approx(float((grouped.std(1) < 1e-6).float().mean()))
    centred = grouped - grouped.mean(1, keepdim=True)
    assert metrics["effective_share"] == pytest.approx(float((centred.abs() > 1e-6).float().mean()))
    assert metrics["effective_share"] > 0
    assert metrics["completions/mean_length"] == pytest.approx(float(lengths.mean()))
    no_eos = ~(r.completion_ids == m.tokenizer.eos_token_id).any(1)
    assert metrics["completions/clipped_ratio"] == pytest.approx(float(no_eos.float().mean()))
    assert metrics["clip_fraction"] == 0.0  # one on-policy pass: rho = 1
    assert metrics["kl"] == 0.0  # no reference model
    assert 0 < metrics["entropy"] <= math.log(len(m.tokenizer))  # nats, at most uniform over the vocabulary
    assert metrics["rollout_tokens_per_s"] > 0 and metrics["time/generate"] > 0
    import csv

    with (tmp_path / "logs" / "version_0" / "completions.csv").open(newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["step", "id", "question", "answer", "completion", "accuracy", "format", "parity", "reward",
                        "advantage"]
    assert len(table) == 1 + 2 * 8  # two steps, table_rows=8
    last = table[-8:]
    assert [row[4] for row in last] == r.completions[:8]
    assert [float(row[8]) for row in last] == pytest.approx(reward[:8].tolist(), abs=1e-3)
    # some rows carried an advantage at each step (the parity reward varies), so the policy moved
    assert any(not torch.equal(p, before[n]) for n, p in m.model.named_parameters())


def test_missing_reward_callback_is_a_clear_error(tiny_data):
    m = _module()
    dm = R1V2DataModule(train_file=str(tiny_data / "train.jsonl"), val_file=None, kind="prompts", batch_size=2)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="RewardCallback"):
        trainer.fit(m, dm)


def test_reference_model_only_with_kl():
    assert _module().ref_model is None
    m = _module(kl_coef=0.05)
    assert m.ref_model is not None and not any(p.requires_grad for p in m.ref_model.parameters())
    with pytest.raises(ValueError, match="group_size"):
        GRPOModule(group_size=1)


def test_one_update_moves_log_probs_in_the_advantage_direction(tiny_data):
    """After a gradient step on the GRPO loss, rows with A > 0 gain log-prob, rows with A < 0 lose it."""
    from lightning_r1v2.losses import group_advantages, grpo_loss

    torch.manual_seed(0)
    m = _module()
    records, _ = read_records(tiny_data / "val.jsonl")
    r = m.engine.generate(m, PromptCollator(m.processor)(records[:4]), group_size=4)
    # a reward that is independent of quality but fixed: alternate 1, 0 inside each group
    rewards = torch.tensor([1.0, 0.0] * (len(r) // 2))
    adv = group_advantages(rewards, 4)
    opt = torch.optim.SGD([p for p in m.model.parameters() if p.requires_grad], lr=0.05)
    mask = r.completion_mask.float()
    logp0, _ = m.sequence_logprobs(m.model, r)
    assert torch.isfinite(logp0).all() and torch.isfinite(r.old_logprobs).all()
    loss, _ = grpo_loss(logp0, r.old_logprobs, adv, mask)
    loss.backward()
    opt.step()
    with torch.no_grad():
        logp1, _ = m.sequence_logprobs(m.model, r)
    delta = ((logp1 - logp0.detach()) * mask).sum(1)
    assert delta[adv > 0].mean() > 0 > delta[adv < 0].mean()


def test_completions_keep_reasoning_markers(tiny_data):
    m = _module()
    records, _ = read_records(tiny_data / "val.jsonl")
    r = m.engine.generate(m, PromptCollator(m.processor)(records[:2]), group_size=2)
    from lightning_r1v2.rollout.hf_engine import decode_completions

    ids = m.tokenizer("<think> red 1 </think> \\boxed{1}", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ids + [m.tokenizer.eos_token_id, m.tokenizer.pad_token_id]])
    mask = torch.tensor([[1] * (len(ids[0]) - 1) + [0]])
    assert decode_completions(m.tokenizer, ids, mask) == ["<think> red 1 </think> \\boxed{1}"]
    assert all(m.tokenizer.eos_token not in c for c in r.completions)
