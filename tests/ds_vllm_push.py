"""VLLMEngine.push_weights under real ZeRO-3 partitioning on two CPU ranks, against a stand-in vLLM.
Run by tests/test_deepspeed_multirank.py: torchrun --nproc_per_node 2 tests/ds_vllm_push.py OUT_DIR TRAIN_FILE

At the start of training (parameters partitioned between the ranks) each rank pushes the policy into
its stand-in ``LLM`` (what ``load_weights`` receives is recorded), once whole and once trainable-only,
then gathers the parameters itself and writes what it pushed and what the full tensors are.
"""
import json
import os
import sys
import types
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepspeed  # noqa: E402
import lightning as L  # noqa: E402
import torch  # noqa: E402

from lightning_r1v2.data.datamodule import R1V2DataModule  # noqa: E402
from lightning_r1v2.modules import GRPOModule  # noqa: E402
from lightning_r1v2.rollout.vllm_engine import VLLMEngine  # noqa: E402
from lightning_r1v2.strategies import CPUDeepSpeedStrategy  # noqa: E402


class _StandInLLM:
    def __init__(self):
        self.pushes: list[dict[str, torch.Tensor]] = []
        self.resets = 0
        model = types.SimpleNamespace(load_weights=self._load)
        self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
            driver_worker=types.SimpleNamespace(model_runner=types.SimpleNamespace(model=model))))

    def _load(self, weights):
        self.pushes[-1].update({name: t.detach().clone() for name, t in weights})  # copied while gathered

    def reset_prefix_cache(self):
        self.resets += 1


class _Stop(Exception):
    pass


class _PushAtStart(L.Callback):
    def __init__(self, out: Path):
        self.out = out

    def on_train_start(self, trainer, module):
        engine, rank = module.engine, trainer.global_rank
        engine.llm = _StandInLLM()
        partitioned = all(p.numel() == 0 or hasattr(p, "ds_id") for p in module.model.parameters())
        sizes = [p.numel() for p in module.model.parameters()]  # local: 0 for partitioned tensors
        counts = []
        for trainable_only in (False, True):
            engine.llm.pushes.append({})
            counts.append(engine.push_weights(module, trainable_only=trainable_only))
        with deepspeed.zero.GatheredParameters(list(module.model.parameters())):
            full = {n: p.detach().clone() for n, p in module.model.named_parameters()}
            trainable = sorted(n for n, p in module.model.named_parameters() if p.requires_grad)
        whole, partial = engine.llm.pushes
        json.dump({
            "partitioned": partitioned, "local_elements": sum(sizes), "counts": counts,
            "resets": engine.llm.resets, "names_whole": sorted(whole), "names_partial": sorted(partial),
            "full_names": sorted(full), "trainable": trainable,
            "equal": all(torch.equal(whole[n], full[n]) for n in whole),
            "total_elements": sum(v.numel() for v in full.values()),
        }, open(self.out / f"rank{rank}.json", "w"))
        raise _Stop  # on every rank, at the same point


def main(out: str, train_file: str):
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    engine = VLLMEngine(max_new_tokens=4, model_path=out)  # a folder: the stand-in never reads it
    module = GRPOModule(engine=engine, group_size=2, trainable=["connector", "llm"])
    dm = R1V2DataModule(train_file=train_file, val_file=None, kind="prompts", batch_size=2)
    config = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1,
              "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0}
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=CPUDeepSpeedStrategy(config=config),
                        precision="32-true", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[_PushAtStart(Path(out))])
    try:
        trainer.fit(module, dm)
    except _Stop:
        pass


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
