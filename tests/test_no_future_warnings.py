"""Our own calls raise no FutureWarning under the pinned transformers (deprecated keywords such as
``past_key_values`` or ``gradient_checkpointing_enable`` are removed in later releases)."""
import warnings
from pathlib import Path

import torch

PKG = str(Path(__file__).resolve().parents[1] / "lightning_r1v2")


def _ours(caught) -> list[str]:
    """FutureWarnings raised at a line of ours, or inside transformers because of what we passed."""
    out = []
    for w in caught:
        if not issubclass(w.category, FutureWarning):
            continue
        text = str(w.message)
        if w.filename.startswith(PKG) or "past_key_values" in text or "gradient_checkpointing" in text:
            out.append(f"{w.filename}:{w.lineno}: {text}")
    return out


def test_a_grpo_step_sft_forward_and_checkpointed_scoring_raise_no_future_warning(tiny_data):
    from lightning_r1v2.data.collate import PromptCollator, SFTCollator
    from lightning_r1v2.data.records import read_records
    from lightning_r1v2.modules.grpo import GRPOModule
    from lightning_r1v2.rollout.hf_engine import HFGenerateEngine

    records, _ = read_records(tiny_data / "val.jsonl")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = GRPOModule(group_size=2, gradient_checkpointing=True, engine=HFGenerateEngine(max_new_tokens=4))
        r = m.engine.generate(m, PromptCollator(m.processor)(records[:2]), 2)  # shared prefill: a cache passed
        m.model.train()
        logp, _ = m.sequence_logprobs(m.model, r)  # checkpointed: one pass
        m.model.eval()
        with torch.no_grad():
            m.sequence_logprobs(m.model, r)  # shared prompt: a cache passed
        batch = SFTCollator(m.processor)([dict(x, response="<think> a </think> \\boxed{A}") for x in records[:2]])
        m.model(**m.model_inputs(batch))
        m.generate(PromptCollator(m.processor)(records[:2]), 3)
    assert logp.requires_grad
    assert not _ours(caught), "\n".join(_ours(caught))
