"""Fit the tiny GRPO config for 2 rollout batches under Lightning's DeepSpeedStrategy on DeepSpeed's
CPU accelerator; print what tests/test_deepspeed_cpu.py checks. Run: DS_ACCELERATOR=cpu
[TRAIN_FILE=records.jsonl] [LORA=1] python tests/ds_cpu_fit.py STAGE [MICRO_BATCH_SIZE] [SFT_CKPT or none]
(LORA=1: rank-8 adapters on the LLM and connector as the only trained tensors, a KL to the base)

``lightning_r1v2.strategies.CPUDeepSpeedStrategy`` bypasses only Lightning's CUDA check and the device
index, so everything else (engine set-up, ZeRO partitioning, manual optimization, generation with
gathered parameters) is the real code path.
"""
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]

import deepspeed  # noqa: E402
import lightning as L  # noqa: E402
import torch  # noqa: E402

from lightning_r1v2.strategies import CPUDeepSpeedStrategy  # noqa: E402
from grpo_step import build_data, build_module, load_config, optimizer_steps_per_batch, reward_callbacks  # noqa: E402


def main(stage: int, micro: int, ckpt: str | None):
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    cfg = load_config()
    lora = {"trainable": [], "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "parts": ["llm", "connector"]},
            "kl_coef": 0.02} if os.environ.get("LORA") == "1" else {}  # configs/tiny/grpo_lora.yaml's adapters
    m = build_module(cfg, 8, 24, ckpt, table_every_n_steps=0, max_grad_norm=0.0, micro_batch_size=micro, **lora)
    # TRAIN_FILE: the test's own data (a fresh clone has no data/tiny)
    dm = build_data(cfg, 4, val_file=None, **({"train_file": os.environ["TRAIN_FILE"]} if "TRAIN_FILE" in os.environ else {}))
    before = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    config = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": 1,
              "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0}
    if micro:
        config["managed_gradient_accumulation"] = False
    rewards = reward_callbacks(cfg)
    if ckpt is None:  # random init: the task's rewards are all 0; a reward that varies within groups
        from lightning_r1v2.rewards import RewardCallback

        rewards = [RewardCallback(lambda completions, **k: [float(len(c) % 3) for c in completions], name="len")]
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=CPUDeepSpeedStrategy(config=config),
                        precision="32-true", max_steps=2 * optimizer_steps_per_batch(m, dm), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=rewards)
    from lightning_r1v2.rollout import hf_engine

    unhooked = []
    real_gathered = hf_engine._gathered

    def spy(module, enabled):
        g = real_gathered(module, enabled)
        unhooked.append(g.unhooked)
        return g

    hf_engine._gathered = spy
    trainer.fit(m, dm)
    partitioned = any(hasattr(p, "ds_id") for p in m.model.parameters())
    with deepspeed.zero.GatheredParameters(list(m.model.parameters())):
        trainable = {n: p.detach().cpu().clone() for n, p in m.model.named_parameters() if p.requires_grad}
        frozen = {n: p.detach().cpu().clone() for n, p in m.model.named_parameters() if not p.requires_grad}
    print("RESULT " + json.dumps({
        "global_step": trainer.global_step,
        "partitioned": partitioned,
        "changed": sum(not torch.equal(v, before[n]) for n, v in trainable.items()),
        "trainable": len(trainable),
        "frozen_unchanged": all(torch.equal(v, before[n]) for n, v in frozen.items()),
        "finite": all(torch.isfinite(v).all().item() for v in trainable.values()),
        "completions": m.last_rollouts.completions,
        "reward": float(trainer.callback_metrics["reward"]),
        "unhooked": unhooked,  # per generate: ZeRO-3's module hooks removed for it (DeepSpeed's unwrap)
    }))


def main_mpo(stage: int, workdir: str):
    """Two MPO steps (reference model kept, ZeRO-partitioned with the policy under stage 3)."""
    from lightning_r1v2.data.pairs import PreferenceDataModule
    from lightning_r1v2.data.records import read_records
    from lightning_r1v2.data.synthetic import make_data
    from lightning_r1v2.modules import MPOModule

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    make_data(workdir, train=8, val=2, seed=1, difficulty="easy")
    records, _ = read_records(Path(workdir) / "train.jsonl")
    pairs = Path(workdir) / "pairs.jsonl"
    with pairs.open("w") as f:
        for rec in records:
            row = {k: rec[k] for k in ("id", "question", "answer")}
            row.update(image=rec["image_rel"], pair_id=f"{rec['id']}/0", chosen=rec["response"],
                       rejected="<think> red 9 </think> \\boxed{9}")
            f.write(json.dumps(row) + "\n")
    m = MPOModule(reference="model", lr=1e-3)
    dm = PreferenceDataModule(train_file=str(pairs), val_file=None, batch_size=4)
    before = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    config = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": 4,
              "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0}
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=CPUDeepSpeedStrategy(config=config),
                        precision="32-true", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    trainer.fit(m, dm)
    with deepspeed.zero.GatheredParameters(list(m.model.parameters())):
        after = {n: p.detach().cpu().clone() for n, p in m.model.named_parameters()}
    print("RESULT " + json.dumps({
        "global_step": trainer.global_step,
        "partitioned": any(hasattr(p, "ds_id") for p in m.model.parameters()),
        "changed": sum(not torch.equal(v, before[n]) for n, v in after.items()),
        "params": len(after),
        "loss": float(trainer.callback_metrics["train/loss"]) if "train/loss" in trainer.callback_metrics
        else float(next(v for k, v in trainer.callback_metrics.items() if "loss" in k)),
    }))


if __name__ == "__main__":
    if sys.argv[1] == "mpo":
        main_mpo(int(sys.argv[2]), sys.argv[3])
        sys.exit(0)
    args = sys.argv[1:]
    main(int(args[0]), int(args[1]) if len(args) > 1 else 0, args[2] if len(args) > 2 and args[2] != "none" else None)
