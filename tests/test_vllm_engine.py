"""VLLMEngine against a stand-in ``vllm`` package (the real one needs a GPU and is never installed here).

The stand-in records every call and is strict: ``LLM``, ``SamplingParams`` and ``LLM.generate``
accept only the argument names of vLLM 0.33's signatures (a misspelt or removed keyword fails here as
it would there), and a prompt only vLLM's keys. It answers like vLLM 0.33: ``LLM.generate`` returns
one output per prompt with ``prompt_token_ids`` (the image placeholder expanded by the stand-in
itself: ``<img>`` + ``image_seq_length`` context tokens per tile + ``</img>``, as vLLM's InternVL
does, not by our processor), ``outputs[j].token_ids``, ``.logprobs`` (one ``{token: Logprob}`` per
position, the sampled token only for ``logprobs=0``) and ``.finish_reason``. It models vLLM's
encoder cache (vision features kept per image uuid, or content hash, across requests; cleared only
by ``llm_engine.reset_encoder_cache()``, not by ``reset_prefix_cache``) and the global reseed that
building an engine does.
"""
import random
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from lightning_r1v2.data.collate import PromptCollator, load_images
from lightning_r1v2.data.records import read_records
from lightning_r1v2.modules import GRPOModule
from lightning_r1v2.rollout.vllm_engine import INSTALL_HINT, VLLMEngine

ROOT = Path(__file__).resolve().parents[1]
G = 3
MAX_NEW = 6


class _Logprob:
    def __init__(self, logprob):
        self.logprob = logprob


class _FakeVLLM:
    """Builds a ``vllm`` module whose objects write to ``self.events`` / ``self.loaded``."""

    def __init__(self, processor):
        self.events: list[str] = []
        self.loaded: list[str] = []
        self.tensors: dict = {}
        self.llm_kwargs: dict = {}
        self.prompts: list = []
        self.params = None
        fake = self
        eos = processor.tokenizer.eos_token_id
        word = processor.tokenizer.convert_tokens_to_ids("red")

        tok = processor.tokenizer
        ctx, img_start, img_end = (tok.convert_tokens_to_ids(t) for t in ("<IMG_CONTEXT>", "<img>", "</img>"))
        per_tile = processor.image_seq_length
        fake.expand = lambda ids: [x for t in ids for x in ([img_start] + [ctx] * per_tile + [img_end] if t == ctx else [t])]
        fake.encoder = {}  # image uuid -> weights version its features were computed with
        fake.version = 0  # bumped by load_weights (the stand-in's own weights)
        fake.stale_hits = 0

        class SamplingParams:
            FIELDS = {"n", "best_of", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature",
                      "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "bad_words", "ignore_eos",
                      "max_tokens", "min_tokens", "logprobs", "prompt_logprobs", "detokenize",
                      "skip_special_tokens", "spaces_between_special_tokens", "logits_processors",
                      "include_stop_str_in_output", "truncate_prompt_tokens", "output_kind", "guided_decoding",
                      "logit_bias", "allowed_token_ids", "extra_args"}

            def __init__(self, **kw):
                unknown = set(kw) - self.FIELDS
                if unknown:
                    raise TypeError(f"SamplingParams got unexpected keyword arguments {sorted(unknown)}")
                self.__dict__.update(kw)
                self.kwargs = kw

        class _Model:
            def load_weights(self, weights):
                fake.events.append("load_weights")
                fake.version += 1
                for name, tensor in weights:
                    assert isinstance(tensor, torch.Tensor)
                    fake.loaded.append(name)
                    fake.tensors[name] = tensor.detach().clone()

        LLM_ARGS = {"model", "tokenizer", "dtype", "gpu_memory_utilization", "tensor_parallel_size",
                    "enable_sleep_mode", "max_model_len", "limit_mm_per_prompt", "logprobs_mode", "seed",
                    "distributed_executor_backend", "max_num_seqs", "enforce_eager", "trust_remote_code",
                    "enable_prefix_caching", "mm_processor_kwargs", "swap_space", "quantization"}

        class LLM:
            def __init__(self, **kw):
                unknown = set(kw) - LLM_ARGS
                if unknown:
                    raise TypeError(f"LLM got unexpected keyword arguments {sorted(unknown)}")
                fake.llm_kwargs = kw
                torch.manual_seed(kw.get("seed", 0))  # as vLLM's engine set-up does (global RNGs reseeded)
                random.seed(kw.get("seed", 0))
                runner = types.SimpleNamespace(model=_Model())

                def reset_encoder_cache():
                    fake.events.append("reset_encoder_cache")
                    fake.encoder.clear()

                self.llm_engine = types.SimpleNamespace(
                    model_executor=types.SimpleNamespace(driver_worker=types.SimpleNamespace(model_runner=runner)),
                    reset_encoder_cache=reset_encoder_cache,
                )

            def generate(self, prompts, sampling_params=None, use_tqdm=True, lora_request=None, priority=None):
                fake.events.append("generate")
                fake.prompts, fake.params = prompts, sampling_params
                outs = []
                for p in prompts:
                    assert set(p) <= {"prompt", "prompt_token_ids", "multi_modal_data", "multi_modal_uuids",
                                      "mm_processor_kwargs"}, set(p)
                    images = p["multi_modal_data"]["image"]
                    images = images if isinstance(images, list) else [images]
                    uuids = p.get("multi_modal_uuids", {}).get("image")
                    uuids = (uuids if isinstance(uuids, list) else [uuids]) if uuids else [
                        hash(im.tobytes()) for im in images]
                    for u in uuids:  # vision features: reused from the cache when the uuid was seen
                        if u in fake.encoder and fake.encoder[u] != fake.version:
                            fake.stale_hits += 1
                        fake.encoder.setdefault(u, fake.version)
                    ids = fake.expand(tok(p["prompt"], add_special_tokens=False)["input_ids"])
                    samples = []
                    for j in range(sampling_params.n):
                        if j == sampling_params.n - 1:  # the last sample hits max_tokens without EOS
                            toks, reason = [word] * sampling_params.max_tokens, "length"
                        else:
                            toks, reason = [word] * (j + 1) + [eos], "stop"
                        lps = [{t: _Logprob(-0.1 * (k + 1))} for k, t in enumerate(toks)]
                        samples.append(types.SimpleNamespace(token_ids=toks, logprobs=lps, finish_reason=reason))
                    outs.append(types.SimpleNamespace(prompt_token_ids=list(ids), outputs=samples))
                return outs

            def reset_prefix_cache(self):
                fake.events.append("reset_prefix_cache")

            def sleep(self, level=1):
                fake.events.append(f"sleep{level}")

            def wake_up(self, tags=None):
                fake.events.append("wake_up" + (f":{','.join(tags)}" if tags else ""))

        self.module = types.ModuleType("vllm")
        self.module.LLM = LLM
        self.module.SamplingParams = SamplingParams


@pytest.fixture(scope="module")
def grpo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vllm_model")  # stands for an HF-layout checkpoint folder
    engine = VLLMEngine(max_new_tokens=MAX_NEW, temperature=0.9, top_p=1.0, top_k=0, model_path=str(folder),
                        gpu_memory_utilization=0.25, max_model_len=512)
    return GRPOModule(engine=engine, group_size=G)


@pytest.fixture
def fake(grpo, monkeypatch):
    f = _FakeVLLM(grpo.processor)
    monkeypatch.setitem(sys.modules, "vllm", f.module)
    grpo.engine.llm, grpo.engine._synced_step, grpo.engine._sleeping = None, None, False
    grpo.engine._weights_version, grpo.engine._calls = 0, 0
    return f


@pytest.fixture
def batch(grpo, tiny_data):
    records, _ = read_records(tiny_data / "val.jsonl")
    return PromptCollator(grpo.processor)(records[:2])


def test_sampling_params_and_llm_settings_map_from_the_yaml_block(grpo, fake, batch):
    grpo.engine.generate(grpo, batch, G)
    p = fake.params.kwargs
    assert p["n"] == G and p["temperature"] == 0.9 and p["top_p"] == 1.0
    assert p["top_k"] == -1  # 0 (off) in our settings is -1 in vLLM
    assert p["max_tokens"] == MAX_NEW and p["logprobs"] == 0
    assert p["stop_token_ids"] == [grpo.tokenizer.eos_token_id]
    assert isinstance(p["seed"], int)
    assert "<IMG_CONTEXT>" in p["bad_words"] and grpo.tokenizer.pad_token in p["bad_words"]
    kw = fake.llm_kwargs
    assert kw["model"] == grpo.engine.model_path and kw["dtype"] == "bfloat16"
    assert kw["gpu_memory_utilization"] == 0.25 and kw["max_model_len"] == 512
    assert kw["tensor_parallel_size"] == 1 and kw["enable_sleep_mode"] is True
    assert kw["logprobs_mode"] == "processed_logprobs"
    assert kw["limit_mm_per_prompt"] == {"image": 1, "video": 0}
    assert "distributed_executor_backend" not in kw  # world size 1: no external launcher


def test_prompts_are_multimodal_with_the_chat_template(grpo, fake, batch):
    grpo.engine.generate(grpo, batch, G)
    assert len(fake.prompts) == 2  # one request per prompt, n = G samples each
    for p, rec in zip(fake.prompts, batch["records"]):
        assert set(p) == {"prompt", "multi_modal_data", "multi_modal_uuids"}
        assert p["multi_modal_uuids"] == {"image": f"{rec['id']}/0@w1"}  # named per weights version
        assert p["prompt"].startswith("<|im_start|>user\n<IMG_CONTEXT>") and rec["question"] in p["prompt"]
        img = p["multi_modal_data"]["image"]
        assert img.size == load_images(rec)[0].size and img.mode == "RGB"


def test_rollouts_shapes_masks_groups_and_old_logprobs(grpo, fake, batch):
    r = grpo.engine.generate(grpo, batch, G)
    N = 2 * G
    assert len(r) == N and r.group_size == G
    assert r.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert r.completion_ids.shape == (N, MAX_NEW) and r.prompt_ids.shape == batch["input_ids"].repeat(G, 1).shape
    assert torch.equal(r.prompt_ids, batch["input_ids"].repeat_interleave(G, 0))  # vLLM's ids == processor's
    assert torch.equal(r.prompt_mask, batch["attention_mask"].repeat_interleave(G, 0))
    # sample j: j+1 words then EOS (mask covers EOS); the last sample is truncated (no EOS, full length)
    assert r.completion_mask[:G].tolist() == [[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1] * 6]
    assert r.truncated.tolist() == [False, False, True] * 2
    assert r.completion_ids[0, 2].item() == grpo.tokenizer.pad_token_id
    expected = torch.tensor([[-0.1, -0.2, 0, 0, 0, 0], [-0.1, -0.2, -0.3, 0, 0, 0],
                             [-0.1, -0.2, -0.3, -0.4, -0.5, -0.6]])
    assert torch.allclose(r.old_logprobs[:G], expected)
    assert r.completions[0] == " red" or r.completions[0].strip() == "red"
    assert len(r.media) == N and r.media[G] is r.media[G + 1] and r.records[G] is batch["records"][1]
    assert torch.equal(r.media[G]["pixel_values"], batch["media"][1]["pixel_values"])
    # the training forward accepts the rows: image tokens and pixel_values agree
    with torch.no_grad():
        logp, _ = grpo.sequence_logprobs(grpo.model, r)
    assert logp.shape == (N, MAX_NEW) and torch.isfinite(logp[r.completion_mask.bool()]).all()


def test_weight_push_sends_every_parameter_and_resets_the_prefix_cache(grpo, fake, batch):
    grpo.engine.generate(grpo, batch, G)
    names = [n for n, _ in grpo.model.named_parameters()]
    assert sorted(fake.loaded) == sorted(names) and len(fake.loaded) == len(set(fake.loaded))
    last_load = max(i for i, e in enumerate(fake.events) if e == "load_weights")
    assert fake.events[last_load + 1] == "reset_prefix_cache"


def test_later_pushes_send_only_the_trainable_parameters(grpo, fake, batch, monkeypatch):
    from lightning_r1v2.models.loading import set_trainable

    set_trainable(grpo.model, ["connector"])
    try:
        grpo.engine.generate(grpo, batch, G)  # first push: everything (the folder may differ from the policy)
        assert len(fake.loaded) == len(list(grpo.model.parameters()))
        fake.loaded.clear()
        monkeypatch.setattr(type(grpo), "global_step", property(lambda self: 1))
        grpo.engine.generate(grpo, batch, G)
        trainable = sorted(n for n, p in grpo.model.named_parameters() if p.requires_grad)
        assert trainable and sorted(fake.loaded) == trainable
        assert all("multi_modal_projector" in n for n in fake.loaded)
    finally:
        set_trainable(grpo.model, ["vision", "connector", "llm"])


def test_sleep_and_wake_order_and_sync_every(grpo, fake, batch, monkeypatch):
    eng = grpo.engine
    eng.generate(grpo, batch, G)  # step 0: first push, then generate, then sleep
    assert [e for e in fake.events if e != "load_weights"] == ["reset_prefix_cache", "reset_encoder_cache", "generate",
                                                               "sleep1"]
    fake.events.clear()
    eng.generate(grpo, batch, G)  # no optimizer step since: wake, no push
    assert fake.events == ["wake_up:weights", "wake_up:kv_cache", "generate", "sleep1"]
    fake.events.clear()
    monkeypatch.setattr(type(grpo), "global_step", property(lambda self: 1))
    eng.generate(grpo, batch, G)  # one optimizer step later: weights first, push, then KV cache
    ev = [e for e in fake.events if e != "load_weights"]
    assert ev == ["wake_up:weights", "reset_prefix_cache", "reset_encoder_cache", "wake_up:kv_cache", "generate", "sleep1"]
    assert fake.events.index("load_weights") == 1


def test_sync_weights_every_n_steps(grpo, fake, batch, monkeypatch):
    eng = grpo.engine
    monkeypatch.setattr(eng, "sync_weights_every", 2)
    step = {"v": 0}
    monkeypatch.setattr(type(grpo), "global_step", property(lambda self: step["v"]))
    pushes = []
    for s in range(5):
        step["v"] = s
        fake.events.clear()
        eng.generate(grpo, batch, G)
        pushes.append("reset_prefix_cache" in fake.events)
    assert pushes == [True, False, True, False, True]


def test_a_multiprocess_engine_core_is_a_clear_error(grpo, fake, batch):
    orig_init = fake.module.LLM.__init__

    def init(self, **kw):
        orig_init(self, **kw)
        self.llm_engine = types.SimpleNamespace()  # no model_executor: the engine core runs in another process

    fake.module.LLM.__init__ = init
    with pytest.raises(RuntimeError, match="VLLM_ENABLE_V1_MULTIPROCESSING=0"):
        grpo.engine.generate(grpo, batch, G)


def test_no_image_feature_outlives_a_weight_push(grpo, fake, batch, monkeypatch):
    """vLLM keeps vision features per image across requests; the prefix reset leaves them."""
    step = {"v": 0}
    monkeypatch.setattr(type(grpo), "global_step", property(lambda self: step["v"]))
    for s in range(3):  # the same images every step, a push before each generation
        step["v"] = s
        grpo.engine.generate(grpo, batch, G)
    assert fake.events.count("load_weights") >= 3 and fake.stale_hits == 0
    # the stand-in does catch staleness: images named without a weights version, no reset
    fake.stale_hits = 0
    monkeypatch.setattr(fake.module.LLM, "generate", _without_uuids(fake.module.LLM.generate))
    grpo.engine.llm.llm_engine.reset_encoder_cache = lambda: None
    for s in (3, 4):
        step["v"] = s
        grpo.engine.generate(grpo, batch, G)
    assert fake.stale_hits > 0


def _without_uuids(generate):
    def wrapped(self, prompts, *a, **k):
        return generate(self, [{k2: v for k2, v in p.items() if k2 != "multi_modal_uuids"} for p in prompts], *a, **k)
    return wrapped


def test_request_seeds_change_per_call_and_agree_across_ranks(grpo, fake, batch):
    seeds = []
    for _ in range(2):
        grpo.engine.generate(grpo, batch, G)
        seeds.append(fake.params.kwargs["seed"])
    assert seeds[0] != seeds[1]
    other = VLLMEngine(model_path=grpo.engine.model_path)  # another rank of the tensor-parallel block
    assert [other.request_seed(0, i) for i in range(2)] == [grpo.engine.request_seed(0, i) for i in range(2)]


def test_building_the_engine_leaves_the_trainers_rngs_alone(grpo, fake, batch):
    torch.manual_seed(123)
    random.seed(123)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(123)
    random.seed(123)
    grpo.engine._build(grpo)  # the stand-in reseeds globally, as vLLM does
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_a_prompt_vllm_expands_differently_is_refused(grpo, fake, batch):
    fake.expand = lambda ids: ids  # e.g. vLLM tiles or sizes the image otherwise than the processor
    with pytest.raises(ValueError, match="differs from the processor's"):
        grpo.engine.generate(grpo, batch, G)


def test_weight_name_map_renames_prefixes(grpo, fake, batch, monkeypatch):
    monkeypatch.setattr(grpo.engine, "weight_name_map", {"model.language_model.": "language_model.model."})
    grpo.engine.generate(grpo, batch, G)
    assert any(n.startswith("language_model.model.") for n in fake.loaded)
    assert not any(n.startswith("model.language_model.") for n in fake.loaded)


def test_missing_vllm_names_the_extra(grpo, batch, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    eng = VLLMEngine(model_path=grpo.engine.model_path)
    with pytest.raises(ImportError, match=r"pip install 'lightning-r1v2\[vllm\]'"):
        eng.generate(grpo, batch, G)
    assert INSTALL_HINT == "pip install 'lightning-r1v2[vllm]'"


def test_tiny_model_name_is_refused(fake, batch, grpo, monkeypatch):
    monkeypatch.setattr(grpo.engine, "model_path", None)
    monkeypatch.setattr(grpo, "model_name", "tiny")
    with pytest.raises(ValueError, match="checkpoint folder"):
        grpo.engine.generate(grpo, batch, G)


def test_default_path_never_imports_vllm(tiny_data):
    code = f"""
import sys
import lightning_r1v2, lightning_r1v2.rollout.vllm_engine
from lightning_r1v2.data.collate import PromptCollator
from lightning_r1v2.data.records import read_records
from lightning_r1v2.modules import GRPOModule
from lightning_r1v2.rollout import HFGenerateEngine
from lightning_r1v2.rollout.vllm_engine import VLLMEngine
VLLMEngine(max_new_tokens=4)
m = GRPOModule(engine=HFGenerateEngine(max_new_tokens=4), group_size=2)
records, _ = read_records({str(tiny_data / 'val.jsonl')!r})
r = m.engine.generate(m, PromptCollator(m.processor)(records[:1]), 2)
assert len(r) == 2
assert "vllm" not in sys.modules, "vllm was imported"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_a_lora_policy_is_pushed_merged_under_the_base_names(grpo, fake, batch, tiny_data):
    """vLLM knows the base architecture: each adapted layer goes as W + (alpha / r) B A, no adapter tensor."""
    from lightning_r1v2.models.lora import merged_state_dict
    from lightning_r1v2.models.loading import load_policy

    m = GRPOModule(engine=grpo.engine, group_size=G, trainable=[], lora={"r": 2, "alpha": 4, "parts": ["llm"]})
    m.model_name = grpo.model_name
    with torch.no_grad():  # adapters that are not zero, as after training
        for n, p in m.model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)
    m.engine.generate(m, batch, G)
    base_names = {n for n, _ in load_policy("tiny")[0].named_parameters()}
    assert set(fake.loaded) == base_names and len(fake.loaded) == len(base_names)  # each once, base names only
    want = merged_state_dict(m.model)
    for name, t in fake.tensors.items():
        assert torch.allclose(t, want[name], atol=1e-6), name
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(fake.tensors[q], dict(m.model.named_parameters())[q.replace(".weight", ".base_layer.weight")])
    fake.loaded.clear()
    m.engine.push_weights(m)  # later pushes: the adapted (merged) layers only
    assert fake.loaded and all(n.startswith("model.language_model.") for n in fake.loaded)
