"""The 38B configs parse with the real LightningCLI parser and describe the run we mean.

The model folder in them is a placeholder, so nothing that loads it is instantiated: the CLI
parses the YAML (every key type-checked against the real signatures), then this test builds only
the trainer's strategy and the rollout engine from the parsed values.
"""
import sys
from pathlib import Path

import pytest
from jsonargparse import Namespace
from jsonargparse.typing import import_object
from lightning.pytorch.cli import LightningCLI

from lightning_r1v2.data.datamodule import R1V2DataModule
from lightning_r1v2.modules.common import PolicyModule

ROOT = Path(__file__).resolve().parents[1]
SCALE = sorted((ROOT / "configs" / "r1v2-38b").glob("*.yaml"))


class _ParseOnly(LightningCLI):
    def instantiate_classes(self) -> None:  # the model path does not exist here: parse, build nothing
        pass


def _parse(path: Path) -> Namespace:
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when pytest's own arguments are present
    try:
        cli = _ParseOnly(PolicyModule, R1V2DataModule, subclass_mode_model=True, subclass_mode_data=True,
                         run=False, args=["--config", str(path)])
    finally:
        sys.argv = argv
    return cli.config


def _build(node: Namespace):
    init = node.init_args.as_dict() if isinstance(node.init_args, Namespace) else dict(node.init_args or {})
    return import_object(node.class_path)(**init)


def test_there_are_three_scale_configs():
    assert {p.stem for p in SCALE} == {"sft", "mpo", "grpo"}


@pytest.mark.parametrize("path", SCALE, ids=lambda p: p.stem)
def test_scale_config_is_zero3_bf16_on_4x8_gpus(path):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from lightning_r1v2.strategies import AtomicDeepSpeedStrategy

    cfg = _parse(path)
    t = cfg.trainer
    assert t.num_nodes == 4 and t.devices == 8 and t.accelerator == "gpu"
    assert t.precision in ("bf16-true", "bf16-mixed")
    assert t.gradient_clip_val is None  # clipping lives in the DeepSpeed config (manual optimization forbids it)
    strategy = _build(t.strategy)
    assert isinstance(strategy, DeepSpeedStrategy) and isinstance(strategy, AtomicDeepSpeedStrategy)
    assert strategy.zero_stage_3 and strategy.config["zero_optimization"]["stage"] == 3
    assert strategy.config["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert strategy.config["gradient_clipping"] > 0
    assert "gradient_accumulation_steps" not in strategy.config  # Lightning sets it, and refuses it here
    m = cfg.model.init_args
    assert m.dtype == "bfloat16" and m.gradient_checkpointing is True
    assert m.model.startswith("/")  # a local folder, never a hub id
    assert m.defer_init is True  # loaded in configure_model, partitioned by ZeRO-3 while loading


def test_grpo_scale_config_uses_vllm_and_the_recipe_numbers():
    cfg = _parse(ROOT / "configs" / "r1v2-38b" / "grpo.yaml")
    m = cfg.model.init_args
    assert cfg.model.class_path == "lightning_r1v2.modules.GRPOModule"
    assert m.group_size == 32 and m.clip_eps == 0.2 and m.kl_coef == 0.0 and m.lr == 1e-6
    assert m.trainable == ["connector"]
    assert m.max_grad_norm == 0.0  # self.clip_gradients is a no-op under DeepSpeed
    assert cfg.data.init_args.batch_size * cfg.trainer.num_nodes * cfg.trainer.devices * m.group_size == 1024
    # R1V3: one optimizer step per 1024-rollout batch, 8K-token rows accumulated one at a time
    assert m.mini_batch_size == 0 and m.micro_batch_size == 1
    assert cfg.trainer.strategy.init_args.config["managed_gradient_accumulation"] is False
    assert m.engine.class_path == "lightning_r1v2.rollout.vllm_engine.VLLMEngine"
    from lightning_r1v2.rollout.vllm_engine import VLLMEngine

    engine = _build(m.engine)
    assert type(engine) is VLLMEngine and engine.llm is None
    assert engine.max_new_tokens == 4096 and engine.temperature == 1.0 and engine.tensor_parallel_size == 4
    assert (cfg.trainer.num_nodes * cfg.trainer.devices) % engine.tensor_parallel_size == 0
    assert "vllm" not in sys.modules  # resolving and building the engine did not import vLLM


def test_mpo_scale_config_recipe_numbers():
    cfg = _parse(ROOT / "configs" / "r1v2-38b" / "mpo.yaml")
    m = cfg.model.init_args
    assert cfg.model.class_path == "lightning_r1v2.modules.MPOModule"
    assert m.beta == 0.1 and list(m.weights) == [0.8, 0.2, 1.0] and m.lr == 5e-6
    assert list(m.betas) == [0.9, 0.999] and m.weight_decay == 0.05 and m.warmup_ratio == 0.05
    t = cfg.trainer
    assert cfg.data.init_args.batch_size * t.num_nodes * t.devices * t.accumulate_grad_batches == 256
