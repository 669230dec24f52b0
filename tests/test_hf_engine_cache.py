"""The static KV cache (the fast path on CUDA: a compiled, graph-replayed decoding step) samples
exactly what the dynamic cache samples: same tokens under the same seed, same recorded log-probs."""
import pytest
import torch

from tiny_families import build_family

G = 3


@pytest.mark.parametrize("model", ["tiny", "qwen2_5_vl", "gemma3"])
def test_static_cache_samples_the_same_tokens_and_logprobs(model, tiny_data, tmp_path, monkeypatch):
    import transformers

    built = []
    init = transformers.StaticCache.__init__
    monkeypatch.setattr(transformers.StaticCache, "__init__", lambda self, *a, **k: built.append(1) or init(self, *a, **k))
    from lightning_r1v2.data.collate import PromptCollator
    from lightning_r1v2.data.records import read_records
    from lightning_r1v2.modules.grpo import GRPOModule
    from lightning_r1v2.rollout.hf_engine import HFGenerateEngine

    name = model if model == "tiny" else str(build_family(model, tmp_path / model))
    m = GRPOModule(model=name, group_size=G)
    m.configure_model()
    records, _ = read_records(tiny_data / "val.jsonl")
    batch = PromptCollator(m.processor)(records[:3])
    out = {}
    for cache in ("dynamic", "static"):
        for greedy in (False, True):
            eng = HFGenerateEngine(max_new_tokens=10, cache=cache, share_prompt_prefill=False,
                                   temperature=1.0, top_k=1 if greedy else 0)
            torch.manual_seed(7)
            n = len(built)
            out[cache, greedy] = eng.generate(m, batch, G)
            assert (len(built) > n) == (cache == "static")  # the static path really ran
    for greedy in (False, True):
        a, b = out["dynamic", greedy], out["static", greedy]
        assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.completion_mask, b.completion_mask)
        assert torch.allclose(a.old_logprobs, b.old_logprobs, atol=1e-5)
    assert not torch.equal(out["dynamic", False].completion_ids, out["dynamic", True].completion_ids)  # really sampled


def test_cache_default_is_static_on_cuda_only():
    from lightning_r1v2.rollout.hf_engine import HFGenerateEngine

    assert HFGenerateEngine().cache_kind("cuda:0") == "static" and HFGenerateEngine().cache_kind("cpu") == "dynamic"
    assert HFGenerateEngine(cache="dynamic").cache_kind("cuda") == "dynamic"
    with pytest.raises(ValueError, match="cache must be"):
        HFGenerateEngine(cache="paged")
