"""LoRA adapters and DeepSpeed ZeRO-3 on every real family's tiny folder (slow: about 2 minutes).

Each run is ``cli.py fit`` in its own process, as a user runs it: ``configs/tiny/grpo_lora.yaml``
(rank-8 adapters, KL to the base with adapters off) and ``configs/tiny/grpo.yaml`` +
``configs/tiny/grpo_zero3_cpu.yaml`` on one rank of DeepSpeed's CPU accelerator (parameters
partitioned, generation gathered), two optimizer steps and a validation, then the checkpoint.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_families import FAMILIES, build_family

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from lightning_r1v2.data.synthetic import make_data

    out = tmp_path_factory.mktemp("scale_data")
    make_data(str(out), train=8, val=4, seed=5, difficulty="easy")
    return out


def _fit(configs: list[str], folder: Path, data: Path, root: Path) -> subprocess.CompletedProcess:
    callbacks = [
        {"class_path": "lightning_r1v2.rewards.RewardCallback",
         "init_args": {"fn": "lightning_r1v2.rewards.accuracy_reward", "name": "accuracy"}},
        {"class_path": "lightning_r1v2.rewards.RewardCallback",
         "init_args": {"fn": "lightning_r1v2.rewards.format_reward", "name": "format"}},
        {"class_path": "lightning_r1v2.callbacks.LastCheckpoint",
         "init_args": {"dirpath": str(root / "checkpoints"), "save_last": True, "enable_version_counter": False}},
    ]
    args = [sys.executable, "cli.py", "fit", *[a for c in configs for a in ("--config", c)],
            "--trainer.devices", "1", "--trainer.max_steps", "2", "--trainer.val_check_interval", "1",
            "--trainer.limit_val_batches", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(root), "--trainer.callbacks", json.dumps(callbacks),
            "--model.init_args.model", str(folder), "--model.init_args.init_ckpt", "null",
            "--model.init_args.engine.init_args.max_new_tokens", "6",
            "--data.init_args.train_file", str(data / "train.jsonl"), "--data.init_args.val_file", str(data / "val.jsonl"),
            "--data.init_args.batch_size", "2", "--data.init_args.eval_batch_size", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_grpo_on_each_family(family, data, tmp_path):
    folder = build_family(family, tmp_path / family)
    run = _fit(["configs/tiny/grpo_lora.yaml"], folder, data, tmp_path / "run")
    assert run.returncode == 0, run.stderr[-4000:]
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 2
    lora = [k for k in state["state_dict"] if ".lora_A." in k or ".lora_B." in k]
    assert lora and all(torch.isfinite(state["state_dict"][k]).all() for k in lora)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_zero3_grpo_on_each_family(family, data, tmp_path):
    folder = build_family(family, tmp_path / family)
    run = _fit(["configs/tiny/grpo.yaml", "configs/tiny/grpo_zero3_cpu.yaml"], folder, data, tmp_path / "run")
    assert run.returncode == 0, run.stderr[-4000:]
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and any(ckpt.rglob("*model_states.pt"))  # ZeRO-3: a folder of partitioned shards
