"""The speed-ups of the GRPO step (issue 10) change no numbers.

- update: each group's prompt and image run once, the KV cache is reused by its completions;
- generate: each prompt is prefilled once and the cache repeated G times;
- fused AdamW; metrics only on logging steps.
Each is compared against the plain computation it replaces.
"""
import lightning as L
import torch

from lightning_r1v2.data.collate import PromptCollator
from lightning_r1v2.data.datamodule import R1V2DataModule
from lightning_r1v2.data.records import read_records
from lightning_r1v2.losses import grpo_loss
from lightning_r1v2.modules import GRPOModule
from lightning_r1v2.rewards import RewardCallback, format_reward
from lightning_r1v2.rollout import HFGenerateEngine, RolloutEngine
from lightning_r1v2.rollout.scoring import _prompt_runs, completion_logits
from lightning_r1v2.rollout.types import Rollouts

G = 4


def _setup(tiny_data, n_prompts=3, **engine_kw):
    torch.manual_seed(0)
    m = GRPOModule(engine=HFGenerateEngine(max_new_tokens=8, temperature=1.3, **engine_kw), group_size=G)
    records, _ = read_records(tiny_data / "val.jsonl")
    batch = PromptCollator(m.processor)(records[:n_prompts])
    return m, batch


def _mixed(r: Rollouts) -> Rollouts:
    """Groups out of order and one group split, as after the buffer or in a mini-batch."""
    order = [4, 5, 0, 1, 2, 3, 8, 9, 10, 11, 6, 7]
    return r.select(order)


def test_shared_prompt_logits_equal_the_one_pass_forward(tiny_data):
    m, batch = _setup(tiny_data)
    r = m.engine.generate(m, batch, G)
    blocked = m.processor
    m.model.eval()
    for rows in (r, _mixed(r)):
        with torch.no_grad():
            plain = completion_logits(m.model, rows, 1.3, blocked, share_prompt=False)
            shared = completion_logits(m.model, rows, 1.3, blocked, share_prompt=True)
        finite = torch.isfinite(plain)
        assert torch.equal(finite, torch.isfinite(shared))  # blocked tokens at -inf in both
        assert torch.allclose(plain[finite], shared[finite], atol=1e-5)


def test_shared_prompt_gradients_equal_the_one_pass_gradients(tiny_data):
    m, batch = _setup(tiny_data)
    r = m.engine.generate(m, batch, G)
    adv = torch.randn(len(r))
    grads = {}
    for share in (False, True):
        m.hparams.share_prompt_forward = share
        m.model.zero_grad()
        logp, _ = m.sequence_logprobs(m.model, r)
        loss, _ = grpo_loss(logp, r.old_logprobs, adv, r.completion_mask.float())
        loss.backward()
        grads[share] = {n: p.grad.clone() for n, p in m.model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    vision = [n for n in grads[True] if "vision" in n]
    assert vision, "gradients must reach the vision tower through the shared prompt cache"
    for n in grads[True]:
        assert torch.allclose(grads[True][n], grads[False][n], atol=1e-6, rtol=1e-4), n


def test_prompt_runs_split_on_a_different_image_with_the_same_text(tiny_data):
    m, batch = _setup(tiny_data, n_prompts=2)
    r = m.engine.generate(m, batch, G)
    first, run_of_row = _prompt_runs(r)
    assert first.tolist() == [0, 4] and run_of_row.tolist() == [0] * 4 + [1] * 4
    # same prompt tokens, other image: must not share
    r.prompt_ids[4:] = r.prompt_ids[0]
    r.prompt_mask[4:] = r.prompt_mask[0]
    other = {"pixel_values": r.media[0]["pixel_values"] + 0.5}
    r.media[4:] = [r.media[0]] * 2 + [other] * 2
    first, run_of_row = _prompt_runs(r)
    assert first.tolist() == [0, 6] and run_of_row.tolist() == [0] * 6 + [1] * 2
    # every row different: nothing to share
    assert _prompt_runs(r.select([0, 6])) is None


def test_gradient_checkpointing_falls_back_to_one_pass(tiny_data, monkeypatch):
    import lightning_r1v2.rollout.scoring as scoring

    m, batch = _setup(tiny_data)
    r = m.engine.generate(m, batch, G)
    m.model.activation_checkpointing_enable()
    m.model.train()
    called = []
    monkeypatch.setattr(scoring, "_shared_prompt", lambda *a: called.append(1))
    logits = completion_logits(m.model, r, 1.0, m.processor)
    assert not called and logits.shape[:2] == r.completion_ids.shape


def test_shared_prefill_samples_what_plain_generate_samples(tiny_data):
    out = {}
    for share in (False, True):
        m, batch = _setup(tiny_data, share_prompt_prefill=share)
        torch.manual_seed(123)
        out[share] = m.engine.generate(m, batch, G)
    a, b = out[False], out[True]
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert a.completions == b.completions
    mask = a.completion_mask.bool()
    assert torch.allclose(a.old_logprobs[mask], b.old_logprobs[mask], atol=1e-5)


def test_engines_share_a_base_class():
    from lightning_r1v2.rollout.vllm_engine import VLLMEngine

    assert issubclass(HFGenerateEngine, RolloutEngine) and issubclass(VLLMEngine, RolloutEngine)
    assert not issubclass(VLLMEngine, HFGenerateEngine)
    import pytest

    with pytest.raises(ValueError, match="temperature"):
        VLLMEngine(temperature=0)
    with pytest.raises(NotImplementedError):
        RolloutEngine().generate(None, {}, 2)


def test_fused_adamw_on_cpu(tiny_data):
    m, _ = _setup(tiny_data)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False)
    m.trainer = trainer
    opt = m.configure_optimizers()["optimizer"]
    assert all(g["fused"] for g in opt.param_groups)


def test_metrics_are_logged_on_logging_steps_only(tiny_data):
    m, _ = _setup(tiny_data)
    calls = []
    real = m.log_dict
    m.log_dict = lambda *a, **k: (calls.append(m.trainer.fit_loop.epoch_loop._batches_that_stepped), real(*a, **k))
    dm = R1V2DataModule(train_file=str(tiny_data / "train.jsonl"), val_file=None, kind="prompts", batch_size=2)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        log_every_n_steps=2, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[RewardCallback(format_reward, name="format", weight=1.0)])
    trainer.fit(m, dm)
    assert calls == [1, 3]  # batches 2 and 4 (counted from 0 before the step ends)
    assert "effective_share" in trainer.callback_metrics and "reward" in trainer.callback_metrics
