"""Critical-token entropy (R1V3's checkpoint-selection signal): the maths by hand, the callback, selection."""
import csv
import math

import lightning as L
import pytest
import torch

from lightning_r1v2.callbacks.entropy import CriticalTokenEntropy, critical_entropy, critical_token_ids
from lightning_r1v2.data.datamodule import R1V2DataModule
from lightning_r1v2.losses import entropy_from_logits
from lightning_r1v2.modules import GRPOModule, SFTModule
from lightning_r1v2.rewards import RewardCallback, accuracy_reward, format_reward
from lightning_r1v2.rollout import HFGenerateEngine


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a small shared CPU two threads made these tests 5x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_entropy_uniform_and_one_hot():
    V = 4
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0],  # uniform over V=4: H = ln 4
                            [3.0, float("-inf"), float("-inf"), float("-inf")],  # one-hot: H = 0
                            [0.0, 0.0, float("-inf"), float("-inf")]]])  # uniform over 2: H = ln 2
    h = entropy_from_logits(logits)  # [1, 3]
    assert torch.allclose(h, torch.tensor([[math.log(V), 0.0, math.log(2)]]), atol=1e-6)


def test_critical_entropy_by_hand():
    ln4 = math.log(4)
    ent = torch.tensor([[ln4, 0.0, 1.0], [2.0, 0.5, 3.0]])
    nxt = torch.tensor([[7, 5, 7], [7, 9, 7]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # (1, 2) is padding: its 3.0 must not count
    # critical positions (0,0) ln4, (0,2) 1.0, (1,0) 2.0
    mean, count = critical_entropy(ent, nxt, mask, {7})
    assert count == 3 and mean == pytest.approx((ln4 + 1.0 + 2.0) / 3, abs=1e-6)
    # per completion: row 0 (ln4 + 1) / 2, row 1 2.0; then their mean
    seq, _ = critical_entropy(ent, nxt, mask, {7}, aggregation="sequence_mean")
    assert seq == pytest.approx(((ln4 + 1.0) / 2 + 2.0) / 2, abs=1e-6)
    assert critical_entropy(ent, nxt, mask, {7}, aggregation="max") == (pytest.approx(2.0), 3)
    # two ids: adds (0,1) 0.0 and (1,1) 0.5
    mean2, count2 = critical_entropy(ent, nxt, mask, {7, 5, 9})
    assert count2 == 5 and mean2 == pytest.approx((ln4 + 1.0 + 2.0 + 0.0 + 0.5) / 5, abs=1e-6)
    # no critical position: NaN and 0, never an error
    nan, zero = critical_entropy(ent, nxt, mask, {42})
    assert math.isnan(nan) and zero == 0
    with pytest.raises(ValueError, match="aggregation"):
        critical_entropy(ent, nxt, mask, {7}, aggregation="sum")


def test_critical_token_ids_on_the_tiny_tokenizer(processor):
    tok = processor.tokenizer
    ids, unmatched = critical_token_ids(tok, ["Wait", "however", "<|im_end|>"], include_think_end=True)
    expected = {tok.convert_tokens_to_ids(t) for t in ("Wait", " Wait", "<|im_end|>", "</think>")}
    assert ids == expected
    assert unmatched == ["however"]  # spelled with several tokens in the tiny vocabulary
    ids, _ = critical_token_ids(tok, ["wait"], include_think_end=False)  # case-insensitive
    assert ids == {tok.convert_tokens_to_ids("Wait"), tok.convert_tokens_to_ids(" Wait")}


def test_measure_is_finite_seeded_and_leaves_the_rng(tiny_data):
    m = SFTModule(seed=0)
    cb = CriticalTokenEntropy(data_file=str(tiny_data / "val.jsonl"), num_prompts=8, max_new_tokens=48)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = cb.measure(m)
    assert torch.equal(torch.get_rng_state(), state)  # measuring does not move the training stream
    assert a["entropy/critical_count"] > 0 and math.isfinite(a["entropy/critical_mean"])
    assert 0 < a["entropy/mean"] <= math.log(len(m.tokenizer)) + 1e-4
    assert 0.0 <= a["entropy/high_share"] <= 1.0
    assert cb.measure(m) == a  # same weights, same seed: the same numbers
    # without </think> and with a token the engine never samples (the image placeholder): NaN, count 0
    none = CriticalTokenEntropy(data_file=str(tiny_data / "val.jsonl"), num_prompts=2, max_new_tokens=8,
                                tokens=["<IMG_CONTEXT>"], include_think_end=False).measure(m)
    assert none["entropy/critical_count"] == 0 and math.isnan(none["entropy/critical_mean"])
    assert math.isfinite(none["entropy/mean"])


def test_grpo_fit_selects_checkpoints_by_critical_entropy(tiny_data, tmp_path):
    torch.manual_seed(0)
    m = GRPOModule(engine=HFGenerateEngine(max_new_tokens=8), group_size=2, lr=1e-3, table_every_n_steps=0)
    dm = R1V2DataModule(train_file=str(tiny_data / "train.jsonl"), val_file=str(tiny_data / "val.jsonl"),
                        kind="prompts", batch_size=2, max_val_records=2)
    ent = CriticalTokenEntropy(data_file=str(tiny_data / "val.jsonl"), num_prompts=8, max_new_tokens=48,
                               every_n_steps=1)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="entropy/critical_mean", mode="max", every_n_train_steps=1,
        filename="step{step}-ent{entropy/critical_mean:.3f}", auto_insert_metric_name=False, save_top_k=1,
    )
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", logger=L.pytorch.loggers.CSVLogger(tmp_path, name="logs"),
        log_every_n_steps=50, val_check_interval=3, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[RewardCallback(accuracy_reward, name="accuracy", weight=0.8),
                   RewardCallback(format_reward, name="format", weight=0.2), ent, ckpt],
    )
    trainer.fit(m, dm)
    assert [s for s, _ in ent.history] == [1, 2, 3]  # every step; validation at step 3 reuses step 3's numbers
    assert all(math.isfinite(st["entropy/critical_mean"]) for _, st in ent.history)
    assert ckpt.best_model_path and math.isfinite(float(ckpt.best_model_score))
    best = max(st["entropy/critical_mean"] for _, st in ent.history)
    assert float(ckpt.best_model_score) == pytest.approx(best, abs=1e-5)
    assert "entropy/critical_mean" in trainer.callback_metrics
    saved = torch.load(ckpt.best_model_path, weights_only=False)["callbacks"][ent.state_key]  # resumable state
    assert [s for s, _ in saved["history"]][0] == 1
    # the loggers got every measurement even though log_every_n_steps is 50
    with (tmp_path / "logs" / "version_0" / "metrics.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("entropy/critical_mean")]
    assert [int(r["step"]) for r in rows][:3] == [1, 2, 3]


def test_validate_logs_and_measures_each_checkpoint_afresh(tiny_data):
    m = SFTModule(seed=0)
    dm = R1V2DataModule(train_file=str(tiny_data / "train.jsonl"), val_file=str(tiny_data / "val.jsonl"),
                        kind="prompts", max_val_records=2)
    ent = CriticalTokenEntropy(data_file=str(tiny_data / "val.jsonl"), num_prompts=4, max_new_tokens=16)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ent])
    first = trainer.validate(m, dm, verbose=False)[0]
    assert {"entropy/critical_mean", "entropy/critical_count", "entropy/mean", "entropy/high_share"} <= set(first)
    assert first["entropy/mean"] == pytest.approx(ent.last_stats["entropy/mean"])
    with torch.no_grad():  # another "checkpoint" at the same global step: measured again, not reused
        m.model.get_output_embeddings().weight.mul_(3.0)
    second = trainer.validate(m, dm, verbose=False)[0]
    assert second["entropy/mean"] != pytest.approx(first["entropy/mean"])


def test_resume_restores_last_stats_from_history():
    # After a resume the GRPO module logs ``last_stats`` with the first row: it must be the last
    # measurement of the checkpoint, not empty (issue 17).
    cb = CriticalTokenEntropy(num_prompts=1)
    cb.history = [(50, {"entropy/critical": 1.25, "entropy/high_share": 0.5}), (100, {"entropy/critical": 0.75})]
    cb.last_stats = {"entropy/critical": 0.75}
    fresh = CriticalTokenEntropy(num_prompts=1)
    fresh.load_state_dict(cb.state_dict())
    assert fresh.last_stats == {"entropy/critical": 0.75} and fresh.history == cb.history
    fresh.load_state_dict({})
    assert fresh.last_stats == {} and fresh.history == []
