"""LoRA through peft: only adapters train, the reference is the base, checkpoints hold the adapters,
export merged and as a PEFT folder load with stock transformers / peft, resume is exact."""
import lightning as L
import pytest
import torch

from lightning_r1v2.data.collate import PromptCollator
from lightning_r1v2.data.datamodule import R1V2DataModule
from lightning_r1v2.data.records import read_records
from lightning_r1v2.modules.grpo import GRPOModule
from lightning_r1v2.rewards import RewardCallback
from lightning_r1v2.rollout.hf_engine import HFGenerateEngine
import test_resume
from test_resume import grpo_cfg, kill_and_resume

data16 = test_resume.data16  # the resume tests' data fixture
LORA = {"r": 4, "alpha": 8, "parts": ["llm", "connector"]}


def _spread(completions, **_):  # a reward with spread within groups, so every step has a gradient
    return [float(len(c) % 3) for c in completions]


def _grpo(**kw):
    kw.setdefault("lora", LORA)
    kw.setdefault("trainable", [])
    return GRPOModule(group_size=4, kl_coef=0.1, lr=1e-2, warmup_ratio=0.0,
                      engine=HFGenerateEngine(max_new_tokens=6), table_every_n_steps=0, **kw)


def _fit(module, data, root, steps, ckpt_path=None):
    L.seed_everything(0)
    dm = R1V2DataModule(train_file=str(data / "train.jsonl"), val_file=None, kind="prompts", batch_size=2)
    from lightning_r1v2.callbacks import LastCheckpoint

    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root,
                        callbacks=[RewardCallback(_spread, name="spread"),
                                   LastCheckpoint(dirpath=root / "checkpoints", save_last=True,
                                                  enable_version_counter=False)])
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer


def _logits(model, batch, processor):
    from lightning_r1v2.models.inputs import policy_io

    kw = policy_io(processor).model_inputs(batch["input_ids"], batch["attention_mask"], batch["media"],
                                          batch["token_inputs"], dtype=torch.float32)
    with torch.no_grad():
        return model(**kw).logits


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_run")
    m = _grpo()
    before = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    trainer = _fit(m, tiny_data, root, 3)
    return m, before, trainer, root


def test_only_adapters_train_and_the_optimizer_holds_only_them(trained):
    m, before, trainer, _ = trained
    changed = {n for n, p in m.model.named_parameters() if not torch.equal(p, before[n])}
    base = [n for n in before if ".lora_" not in n]
    assert base and all(torch.equal(dict(m.model.named_parameters())[n], before[n]) for n in base)  # bit-identical
    assert changed and all(".lora_B." in n or ".lora_A." in n for n in changed)
    assert any(".multi_modal_projector." in n for n in changed) and any(".language_model." in n for n in changed)
    opt = trainer.optimizers[0]
    in_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    lora = sum(p.numel() for n, p in m.model.named_parameters() if ".lora_" in n)
    assert in_opt == lora == m.param_counts["trainable"] and lora < 0.05 * sum(p.numel() for p in before.values())
    # adapters are 2-D only: one (weight-decayed) group, no empty one (ZeRO-3 drops an empty group from the
    # optimizer it builds, and the LR schedule's per-group base LRs then no longer match: a crash at sched.step())
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == m.hparams.weight_decay
    assert len(trainer.lr_scheduler_configs[0].scheduler.base_lrs) == 1


def test_the_reference_is_the_base_model_with_adapters_off(trained, tiny_data):
    from lightning_r1v2.models.loading import load_policy

    m, _, _, _ = trained
    base, processor = load_policy("tiny")  # the same init seed: the weights the adapters sit on
    records, _ = read_records(tiny_data / "val.jsonl")
    batch = PromptCollator(processor)(records[:2])
    ref = _logits(m.ref_model, batch, processor)
    assert torch.allclose(ref, _logits(base.eval(), batch, processor), atol=1e-5)
    m.model.eval()
    assert not torch.allclose(_logits(m.model, batch, processor), ref, atol=1e-3)  # the adapters did learn
    assert all(type(x).__name__ != "InternVLForConditionalGeneration" for x in [m.ref_model])  # no second copy


def test_checkpoint_holds_the_trained_tensors_and_export_loads_merged_and_as_peft(trained, tiny_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from lightning_r1v2.jobs.export import export

    m, _, _, root = trained
    ckpt = root / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert saved["state_dict"] and all(".lora_" in k for k in saved["state_dict"])
    assert saved["r1v2_lora"]["base"] == "tiny"
    records, _ = read_records(tiny_data / "val.jsonl")
    batch = PromptCollator(m.processor)(records[:2])
    m.model.eval()
    want = _logits(m.model, batch, m.processor)
    export(str(ckpt), str(tmp_path / "merged"), merge=True)
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    assert not any(".lora_" in n for n, _ in merged.named_parameters())
    assert torch.allclose(_logits(merged, batch, m.processor), want, atol=1e-5)
    export(str(ckpt), str(tmp_path / "peft"), merge=False)
    base = AutoModelForImageTextToText.from_pretrained(tmp_path / "peft" / "base")
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft" / "adapter").eval()
    assert torch.allclose(_logits(peft_model, batch, m.processor), want, atol=1e-5)


def test_resume_is_exact(data16, tmp_path):
    """Killed after 2 of 4 rollout batches and resumed through the CLI, as tests/test_resume.py does for
    full fine-tuning: the same prompts, RNG streams and weights after every batch as a run never stopped."""
    cfg = grpo_cfg(data16)
    cfg["model"].update(lora=LORA, trainable=[])
    facts = kill_and_resume("grpo", tmp_path, kill_after=2, batches=4, **cfg)
    state = facts["straight"]["state_dict"]
    assert state and all(".lora_" in k for k in state)  # the compared checkpoints hold the adapters only


def test_mpo_with_lora_keeps_the_base_and_a_lora_checkpoint_seeds_the_next_stage(tiny_data, tmp_path, trained):
    from test_pairs import write_pairs

    from lightning_r1v2.data.pairs import PreferenceDataModule
    from lightning_r1v2.models.loading import load_policy
    from lightning_r1v2.modules.mpo import MPOModule

    _, _, _, root = trained
    ckpt = root / "checkpoints" / "last.ckpt"
    path = tiny_data / "lora_pairs.jsonl"  # beside the images
    write_pairs(tiny_data, path, n=4)
    # init from the LoRA GRPO checkpoint: its adapters are merged into the weights the MPO adapters sit on
    m = MPOModule(init_ckpt=str(ckpt), lora=LORA, trainable=[], reference="model", lr=1e-2)
    grpo_merged = GRPOModule(init_ckpt=str(ckpt))  # the same merge, without new adapters
    base_names = [n for n, _ in m.model.named_parameters() if ".lora_" not in n]
    start = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    plain = dict(grpo_merged.model.named_parameters())
    assert all(torch.equal(start[n], plain[n.replace(".base_layer.", ".")]) for n in base_names)
    fresh, _ = load_policy("tiny")
    assert not torch.equal(plain["model.language_model.layers.0.self_attn.q_proj.weight"],
                           dict(fresh.named_parameters())["model.language_model.layers.0.self_attn.q_proj.weight"])
    dm = PreferenceDataModule(train_file=str(path), val_file=None, batch_size=2)
    L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
              enable_model_summary=False).fit(m, dm)
    after = dict(m.model.named_parameters())
    assert all(torch.equal(after[n], start[n]) for n in base_names)
    assert any(not torch.equal(after[n], start[n]) for n in start if ".lora_B." in n)


def test_lora_settings_are_checked():
    with pytest.raises(ValueError, match="both trained in full"):
        GRPOModule(lora=LORA)  # trainable defaults to every part
    with pytest.raises(ValueError, match="lora.parts"):
        GRPOModule(lora={"parts": ["decoder"]}, trainable=[])
    with pytest.raises(ValueError, match="no linear layer"):
        GRPOModule(lora={"target_modules": ["nope_proj"]}, trainable=[])
