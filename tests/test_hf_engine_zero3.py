"""HFGenerateEngine under ZeRO-3: gathered once (default), or layer by layer with ``synced_gpus``.

With the parameters partitioned and not gathered, every forward of ``generate`` is a collective;
a rank whose samples have all ended would stop stepping and leave the others waiting in their
gathers (trap 5 of docs/scale.md). transformers turns ``synced_gpus`` on by itself only while a
``HfDeepSpeedConfig`` is alive (``PolicyModule`` keeps one from ``configure_model`` to ``teardown``);
the engine passes it itself, so it does not depend on that window.
"""
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from lightning_r1v2.data.collate import PromptCollator
from lightning_r1v2.data.records import read_records
from lightning_r1v2.modules import GRPOModule
from lightning_r1v2.rollout import HFGenerateEngine, hf_engine


@pytest.mark.parametrize("gather, world, stage, synced", [
    (False, 2, 3, True),   # layer by layer across ranks: must sync
    (True, 2, 3, None),    # gathered once: no collective inside generate
    (False, 1, 3, None),   # one rank: nothing to wait for
    (False, 2, 2, None),   # ZeRO-2: parameters whole on every rank
])
def test_generate_syncs_ranks_only_when_it_gathers_layer_by_layer(tiny_data, monkeypatch, gather, world, stage,
                                                                  synced):
    m = GRPOModule(engine=HFGenerateEngine(max_new_tokens=3, gather_zero3=gather), group_size=2)
    m._trainer = SimpleNamespace(strategy=DeepSpeedStrategy(stage=stage))
    monkeypatch.setattr(hf_engine, "world_and_rank", lambda: (world, 0))
    seen = {}
    real = m.model.generate

    def spy(**kw):
        seen.update(kw)
        return real(**{k: v for k, v in kw.items() if k != "synced_gpus"})  # one process: no peers to sync

    monkeypatch.setattr(m.model, "generate", spy)
    records, _ = read_records(tiny_data / "val.jsonl")
    out = m.engine.generate(m, PromptCollator(m.processor)(records[:2]), 2)
    assert seen.get("synced_gpus") is synced
    assert out.completion_ids.shape[0] == 4 and torch.isfinite(out.old_logprobs).all()
