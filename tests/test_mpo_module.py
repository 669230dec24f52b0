"""MPOModule: log-probs of the joint forward pass, both references, delta and its checkpointing, a short fit."""
import lightning as L
import pytest
import torch

from lightning_r1v2.data.collate import SFTCollator
from lightning_r1v2.data.pairs import PairCollator, PreferenceDataModule, read_pairs
from lightning_r1v2.losses import shift_for_causal_lm, token_logprobs
from lightning_r1v2.modules import MPOModule


def _separate_logps(module, records, key, processor):
    """Sum of response-token log-probs, each response in its own SFT-style batch (independent padding)."""
    batch = SFTCollator(processor)([dict(r, response=r[key]) for r in records])
    am = batch["attention_mask"]
    out = module.model(input_ids=batch["input_ids"], attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0),
                       pixel_values=torch.cat([m["pixel_values"] for m in batch["media"]]))
    logits, labels = shift_for_causal_lm(out.logits, batch["labels"])
    return (token_logprobs(logits, labels) * (labels != -100)).sum(-1)


def test_one_forward_for_chosen_and_rejected_equals_two(pairs_file, processor):
    torch.manual_seed(0)
    m = MPOModule(reference="model").eval()
    pairs, _ = read_pairs(pairs_file)
    batch = PairCollator(m.processor)(pairs[:4])
    with torch.no_grad():
        joint, n_tok = m.response_logprobs(m.model, batch)  # [8]
        chosen = _separate_logps(m, pairs[:4], "chosen", processor)
        rejected = _separate_logps(m, pairs[:4], "rejected", processor)
    assert torch.allclose(joint[:4], chosen, atol=1e-4) and torch.allclose(joint[4:], rejected, atol=1e-4)
    tok = processor.tokenizer
    assert n_tok[:4].tolist() == [len(tok(p["chosen"], add_special_tokens=False)["input_ids"]) + 1 for p in pairs[:4]]


def test_precomputed_reference_equals_the_model_reference(pairs_file):
    torch.manual_seed(0)
    by_model = MPOModule(reference="model", seed=1)
    pre = MPOModule(reference="precomputed", seed=1, ref_batch_size=3)  # other batching, other padding
    assert pre.ref_model is None and by_model.ref_model is not None
    assert not any(p.requires_grad for p in by_model.ref_model.parameters())
    pairs, _ = read_pairs(pairs_file)
    collate = PairCollator(pre.processor)
    assert pre.precompute_reference(pairs, collate) == 8
    assert pre.precompute_reference(pairs, collate) == 0  # computed once
    batch = collate(pairs[2:7])
    rc_m, rr_m = by_model.reference_logprobs(batch)
    rc_p, rr_p = pre.reference_logprobs(batch)
    assert torch.allclose(rc_m, rc_p, atol=1e-4) and torch.allclose(rr_m, rr_p, atol=1e-4)


def test_precompute_is_sharded_over_ranks_in_lockstep(pairs_file, monkeypatch):
    """Two ranks each score half the pairs with the same number of forward passes; the union is the table."""
    from types import SimpleNamespace

    import lightning_r1v2.modules.mpo as mpo_mod

    pairs, _ = read_pairs(pairs_file)
    pairs = pairs[:7]  # rank 0 gets 4 (batches of 3 + 1), rank 1 gets 3 (3 + a filler batch)
    full = MPOModule(reference="precomputed", seed=1)
    full.precompute_reference(pairs, PairCollator(full.processor))
    parts, forwards = [], []
    for rank in range(2):
        m = MPOModule(reference="precomputed", seed=1, ref_batch_size=3)
        m._trainer = SimpleNamespace(world_size=2, global_rank=rank)
        calls = []
        orig = m.response_logprobs
        monkeypatch.setattr(m, "response_logprobs", lambda model, batch, orig=orig, calls=calls: calls.append(1) or orig(model, batch))
        monkeypatch.setattr(mpo_mod, "all_ranks", lambda obj: [obj, {}])  # this rank's table, then the other's
        assert m.precompute_reference(pairs, PairCollator(m.processor)) == 7
        m._trainer = None
        parts.append(dict(m.ref_logps))
        forwards.append(len(calls))
    assert forwards == [2, 2]  # ceil(ceil(7 / 2) / 3) on each rank
    assert set(parts[0]) == {p["pair_id"] for p in pairs[0::2]} and set(parts[1]) == {p["pair_id"] for p in pairs[1::2]}
    merged = {**parts[0], **parts[1]}
    assert merged.keys() == full.ref_logps.keys()
    for k, v in merged.items():
        assert v == pytest.approx(full.ref_logps[k], abs=1e-4)


def _trainer(tmp_path, steps, **kw):
    return L.Trainer(
        max_steps=steps, accelerator="cpu", logger=L.pytorch.loggers.CSVLogger(tmp_path, name="logs"),
        enable_checkpointing=False, log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, **kw,
    )


@pytest.mark.parametrize("reference", ["model", "precomputed"])
def test_fit_three_steps_logs_terms_and_delta_survives_a_checkpoint(pairs_file, tiny_data, tmp_path, reference):
    torch.manual_seed(0)
    m = MPOModule(reference=reference, lr=1e-3, warmup_ratio=0.0, eval_max_new_tokens=4)
    dm = PreferenceDataModule(train_file=str(pairs_file), val_file=str(tiny_data / "val.jsonl"), batch_size=2,
                              max_val_records=4, eval_batch_size=4)
    before = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    trainer = _trainer(tmp_path, 3, val_check_interval=3)
    trainer.fit(m, dm)
    metrics = trainer.logged_metrics
    for key in ("train/loss", "train/loss/pref", "train/loss/qual", "train/loss/gen", "train/delta",
                "train/rewards/accuracy", "train/rewards/margin", "train/rewards/chosen", "train/rewards/rejected",
                "train/logps/chosen", "train/logps/rejected", "train/lr", "val/accuracy", "val/format",
                "val/accuracy_letter_only"):
        assert key in metrics, key
    v = {k: float(x) for k, x in metrics.items()}
    # the last step's values hang together: L = 0.8 pref + 0.2 qual + 1.0 gen (InternVL's weights),
    # margin = chosen - rejected, accuracy a share of 2 pairs, lr of step 2 of 3 without warmup:
    # 1e-3 * (1 + cos(pi * 2 / 3)) / 2 = 2.5e-4
    assert v["train/loss"] == pytest.approx(0.8 * v["train/loss/pref"] + 0.2 * v["train/loss/qual"]
                                            + v["train/loss/gen"], rel=1e-5)
    assert v["train/rewards/margin"] == pytest.approx(v["train/rewards/chosen"] - v["train/rewards/rejected"], abs=1e-6)
    assert v["train/rewards/accuracy"] in (0.0, 0.5, 1.0)
    assert v["train/lr"] == pytest.approx(2.5e-4, rel=1e-6)
    assert metrics["val/accuracy_letter_only"] <= metrics["val/accuracy"]  # letters only: a subset of what counts
    assert any(not torch.equal(before[n], p) for n, p in m.model.named_parameters())
    if reference == "model":  # the reference stays the initial policy
        assert all(torch.equal(before[n], p) for n, p in m.ref_model.named_parameters())
    else:
        assert len(m.ref_logps) == 8
    # delta: 3 updates of 2 pairs x (chosen, rejected); the first step used 0, the last logged the value before it
    assert m.delta.count == 12 and m.delta.value != 0.0
    assert float(metrics["train/delta_next"]) == pytest.approx(m.delta.value, abs=1e-6)
    path = tmp_path / "mpo.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["mpo_delta"] == m.delta.state_dict()
    assert ckpt["r1v2_module_class"] == "lightning_r1v2.modules.mpo.MPOModule"
    from lightning_r1v2.jobs.export import load_module

    loaded = load_module(str(path))  # what build-pairs does for the next MPO round
    assert isinstance(loaded, MPOModule)
    assert loaded.delta.state_dict() == m.delta.state_dict() and loaded.ref_logps == m.ref_logps
    for n, p in m.model.named_parameters():
        assert torch.equal(p, dict(loaded.model.named_parameters())[n])


def test_resume_continues_delta_and_reuses_stored_reference(pairs_file, tmp_path):
    torch.manual_seed(0)
    m = MPOModule(reference="precomputed", lr=1e-3, warmup_ratio=0.0)
    dm = PreferenceDataModule(train_file=str(pairs_file), val_file=None, batch_size=2)
    trainer = _trainer(tmp_path, 2)
    trainer.fit(m, dm)
    path = tmp_path / "two.ckpt"
    trainer.save_checkpoint(path)
    stored = dict(m.ref_logps)
    m2 = MPOModule(reference="precomputed", lr=1e-3, warmup_ratio=0.0)
    m2.ref_logps = {}
    dm2 = PreferenceDataModule(train_file=str(pairs_file), val_file=None, batch_size=2)
    trainer2 = _trainer(tmp_path, 3)
    trainer2.fit(m2, dm2, ckpt_path=str(path))
    assert m2.ref_logps == stored  # restored, not recomputed under the trained policy
    assert m2.delta.count == 12  # 8 from the first run + 4 from the resumed step


def test_bad_arguments():
    with pytest.raises(ValueError, match="reference must be one of"):
        MPOModule(reference="none")
    with pytest.raises(ValueError, match="beta must be > 0"):
        MPOModule(beta=0.0)


def first_sample_passes(completions, id, **kwargs):
    """A fake reward: the first sample of each record scores 1, the others 0 (so every question pairs)."""
    seen, out = set(), []
    for rid in id:
        out.append(0.0 if rid in seen else 1.0)
        seen.add(rid)
    return out


def test_reference_logps_stored_by_build_pairs_are_used_only_for_the_same_policy(tiny_data, tmp_path, capsys):
    from lightning_r1v2.jobs.build_pairs import build_pairs

    torch.manual_seed(0)
    policy = MPOModule(reference="precomputed", seed=5)
    t = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    t.strategy.connect(policy)
    ckpt = tmp_path / "policy.ckpt"
    t.save_checkpoint(ckpt)
    out = tmp_path / "pairs.jsonl"
    rewards = [{"class_path": "lightning_r1v2.rewards.RewardCallback",
                "init_args": {"fn": first_sample_passes, "name": "accuracy"}}]
    rep = build_pairs(str(ckpt), data=str(tiny_data / "train.jsonl"), out=str(out), num_samples=3, max_new_tokens=5,
                      max_pairs_per_question=1, rewards=rewards, limit=4, store_ref_logps=True, ref_batch_size=3)
    pairs, _ = read_pairs(out)
    assert rep["pairs"] == len(pairs) == 4 and all(p["ref_policy"] == str(ckpt) for p in pairs)
    # the stored values are what the MPO module computes itself under that policy
    fresh = MPOModule(reference="precomputed", init_ckpt=str(ckpt), seed=0)
    fresh.precompute_reference(pairs, PairCollator(fresh.processor))
    for p in pairs:
        assert (p["ref_chosen_logp"], p["ref_rejected_logp"]) == pytest.approx(fresh.ref_logps[p["pair_id"]], abs=1e-4)

    def fit_and_message(init_ckpt):
        m = MPOModule(reference="precomputed", init_ckpt=init_ckpt, lr=1e-4)
        dm = PreferenceDataModule(train_file=str(out), val_file=None, batch_size=2)
        capsys.readouterr()
        _trainer(tmp_path, 1).fit(m, dm)
        return m, capsys.readouterr().out

    m, msg = fit_and_message(str(ckpt))
    assert "read from the pairs file" in msg and len(m.ref_logps) == 4
    m, msg = fit_and_message(None)  # another initial policy: the stored values do not apply
    assert "scored 4 pairs" in msg
