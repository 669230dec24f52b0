"""``cli.py convert``: a Skywork R1V-layout folder becomes an InternVL ``-hf`` folder.

The Skywork folder is built here: a tiny random InternVL ``-hf`` model (the reference) has its
weights written under Skywork's names (``vision_model.*`` with fused ``attn.qkv``, ``mlp1.*``,
``language_model.*``) in two safetensors shards, next to a ``config.json`` in Skywork's layout and the
tiny tokenizer without InternVL's token declarations. The inverse mapping below is written for the
test, independently of ``lightning_r1v2.jobs.convert``.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, InternVLConfig, InternVLForConditionalGeneration

from lightning_r1v2.jobs.convert import convert
from lightning_r1v2.models.loading import load_policy
from lightning_r1v2.models.tiny import IMG_CONTEXT, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# The two InternViT flavours: 6B (R1V, R1V2, R1V3: RMSNorm, q/k norm, no qkv bias) and 300M.
VARIANTS = {
    "vit6b": dict(norm_type="rms_norm", use_qk_norm=True, attention_bias=False),
    "vit300m": dict(norm_type="layer_norm", use_qk_norm=False, attention_bias=True),
}
# QwQ-32B's turn format (R1V2's LLM), string content only: the converter must handle images itself.
QWQ_LIKE_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n<think>\\n' }}{%- endif -%}"
)


def reference_model(variant: str, tokenizer) -> InternVLForConditionalGeneration:
    """A tiny untied InternVL -hf model whose every weight is random (no 0/1 inits a swap could hide behind)."""
    config = InternVLConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=8, **VARIANTS[variant]),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer) + 11, hidden_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT), image_seq_length=4, downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1.0 if p.dim() == 1 and ("norm" in name or "lambda" in name) else 0.0
            p.copy_(scale + 0.3 * torch.randn_like(p) if scale else p + 0.05 * torch.randn_like(p))
    return model


def skywork_weights(model) -> dict[str, torch.Tensor]:
    """The reference's weights under Skywork's names (the inverse of the conversion, written here)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out = {}
    renames = [
        (r"^model\.vision_tower\.embeddings\.cls_token$", "vision_model.embeddings.class_embedding"),
        (r"^model\.vision_tower\.embeddings\.position_embeddings$", "vision_model.embeddings.position_embedding"),
        (r"^model\.vision_tower\.embeddings\.patch_embeddings\.projection\.", "vision_model.embeddings.patch_embedding."),
        (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.attention\.projection_layer\.", r"vision_model.encoder.layers.\1.attn.proj."),
        (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.attention\.([qk])_norm\.", r"vision_model.encoder.layers.\1.attn.\2_norm."),
        (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.lambda_(\d)$", r"vision_model.encoder.layers.\1.ls\2"),
        (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.layernorm_before\.", r"vision_model.encoder.layers.\1.norm1."),
        (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.layernorm_after\.", r"vision_model.encoder.layers.\1.norm2."),
        (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
        (r"^model\.multi_modal_projector\.layer_norm\.", "mlp1.0."),
        (r"^model\.multi_modal_projector\.linear_1\.", "mlp1.1."),
        (r"^model\.multi_modal_projector\.linear_2\.", "mlp1.3."),
        (r"^model\.language_model\.", "language_model.model."),
        (r"^lm_head\.", "language_model.lm_head."),
    ]
    for layer in range(model.config.vision_config.num_hidden_layers):
        pre = f"model.vision_tower.encoder.layer.{layer}.attention."
        for kind in ("weight", "bias"):
            parts = [sd.pop(f"{pre}{p}_proj.{kind}", None) for p in "qkv"]
            if parts[0] is not None:  # InternViT: qkv = Linear(C, 3C), read as [3, heads, head_dim]
                out[f"vision_model.encoder.layers.{layer}.attn.qkv.{kind}"] = torch.cat(parts, 0)
    for name, t in sd.items():
        new = next((re.sub(p, r, name) for p, r in renames if re.match(p, name)), None)
        assert new is not None, name
        out[new] = t.contiguous()
    return out


def skywork_config(model) -> dict:
    """``config.json`` in Skywork's layout (keys of the R1V/R1V2/R1V3 releases)."""
    v, t = model.config.vision_config, model.config.text_config
    return {
        "architectures": ["SkyworkChatModel"],
        "auto_map": {"AutoConfig": "configuration_skywork_chat.SkyworkChatConfig",
                     "AutoModel": "modeling_skywork_chat.SkyworkChatModel"},
        "model_type": "skywork_chat",
        "downsample_ratio": 0.5, "dynamic_image_size": True, "force_image_size": v.image_size[0],
        "max_dynamic_patch": 12, "min_dynamic_patch": 1, "ps_version": "v2", "select_layer": -1,
        "template": "skywork-r1v2", "use_thumbnail": True, "torch_dtype": "float32",
        "use_backbone_lora": 0, "use_llm_lora": 0,
        "vision_config": {
            "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": v.hidden_size,
            "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
            "intermediate_size": v.intermediate_size, "image_size": v.image_size[0], "patch_size": v.patch_size[0],
            "norm_type": v.norm_type, "qk_normalization": v.use_qk_norm, "qkv_bias": v.attention_bias,
            "hidden_act": "gelu", "layer_norm_eps": 1e-6, "num_channels": 3, "dropout": 0.0,
            "attention_dropout": 0.0, "drop_path_rate": 0.0, "initializer_factor": 0.1, "use_flash_attn": True,
        },
        "llm_config": {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size, "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
            "intermediate_size": t.intermediate_size, "max_position_embeddings": t.max_position_embeddings,
            "rms_norm_eps": t.rms_norm_eps, "rope_theta": 10000.0, "tie_word_embeddings": False,
            "eos_token_id": t.eos_token_id, "bos_token_id": None, "torch_dtype": "bfloat16",
            "attn_implementation": "flash_attention_2",  # the releases carry it; it must not reach a CPU load
            "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 64,
        },
    }


def make_skywork_folder(folder: Path, variant: str = "vit6b"):
    """Write the Skywork-layout folder; return the reference model."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    model = reference_model(variant, tok)
    tok.chat_template = QWQ_LIKE_TEMPLATE
    tok.save_pretrained(folder)
    cfg_file = folder / "tokenizer_config.json"  # Skywork's tokenizer has the tokens but declares no roles
    cfg = json.loads(cfg_file.read_text())
    for key in ("start_image_token", "end_image_token", "context_image_token", "video_token", "extra_special_tokens",
                "think_start_token", "think_end_token", "turn_start_token", "processor_class"):
        cfg.pop(key, None)
    cfg_file.write_text(json.dumps(cfg))
    (folder / "config.json").write_text(json.dumps(skywork_config(model), indent=2))
    weights = skywork_weights(model)
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in weights.items() if not k.startswith("language_model.")},
              "model-00002-of-00002.safetensors": {k: v for k, v in weights.items() if k.startswith("language_model.")}}
    for name, part in shards.items():
        save_file(part, str(folder / name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: n for n, part in shards.items() for k in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return model


def _inputs(processor):
    """A wide image (two tiles + thumbnail) and a square one (one tile), prompts from the chat template."""
    wide = Image.new("RGB", (64, 32), (200, 30, 30))
    wide.paste((20, 20, 220), (40, 0, 64, 20))
    square = Image.new("RGB", (32, 32), (10, 180, 40))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many squares?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return processor(images=[wide, square], text=[text, text], return_tensors="pt", padding=True)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_converted_weights_and_logits_equal_the_source(variant, tmp_path, capsys):
    src, out = tmp_path / "skywork", tmp_path / "hf"
    ref = make_skywork_folder(src, variant)
    convert(str(src), str(out))
    printed = capsys.readouterr().out
    assert "shard 1/2" in printed and "shard 2/2" in printed  # a progress line per shard
    model, info = AutoModelForImageTextToText.from_pretrained(str(out), output_loading_info=True)
    assert type(model) is InternVLForConditionalGeneration
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ref_sd = ref.state_dict()
    assert set(model.state_dict()) == set(ref_sd)
    for name, p in model.state_dict().items():
        assert torch.equal(p, ref_sd[name]), name  # every weight lands, bit for bit

    _, processor = load_policy(str(out))
    enc = _inputs(processor)
    # 64x32 px: a 2x1 grid of 32 px tiles plus the thumbnail = 3 tiles; 32x32: one tile. 4 tokens per tile.
    assert enc["pixel_values"].shape == (4, 3, 32, 32)
    n_ctx = (enc["input_ids"] == model.config.image_token_id).sum(1)
    assert n_ctx.tolist() == [12, 4]
    model.eval()
    with torch.no_grad():
        got = model(**enc).logits
        want = ref(**enc).logits
    assert got.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the test can fail: q and k of one ViT layer swapped moves the logits well past the tolerance
    with torch.no_grad():
        att = model.model.vision_tower.encoder.layer[0].attention
        q = att.q_proj.weight.clone()
        att.q_proj.weight.copy_(att.k_proj.weight)
        att.k_proj.weight.copy_(q)
        assert (model(**enc).logits - want).abs().max() > 1e-3


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("skywork")
    make_skywork_folder(root / "src")
    convert(str(root / "src"), str(root / "hf"))
    return root


def test_converted_folder_declares_stock_classes_and_loads_with_our_loader(converted):
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    out = converted / "hf"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "internvl" and config["architectures"] == ["InternVLForConditionalGeneration"]
    assert config["vision_config"]["use_qk_norm"] and config["vision_config"]["norm_type"] == "rms_norm"
    assert config["image_seq_length"] == 4  # (32 / 8)^2 * 0.5^2
    assert "attn_implementation" not in config["text_config"]
    proc_cfg = json.loads((out / "processor_config.json").read_text())
    assert proc_cfg["processor_class"] == PROCESSOR_MAPPING_NAMES["internvl"] == "InternVLProcessor"
    image = proc_cfg["image_processor"]
    assert image["image_processor_type"] == "GotOcr2ImageProcessor"
    assert image["crop_to_patches"] is True and image["max_patches"] == 12 and image["min_patches"] == 1
    assert image["image_mean"] == [0.485, 0.456, 0.406] and image["size"] == {"height": 32, "width": 32}
    assert proc_cfg["video_processor"]["video_processor_type"] == "InternVLVideoProcessor"
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["processor_class"] == "InternVLProcessor"
    assert (tok_cfg["start_image_token"], tok_cfg["end_image_token"], tok_cfg["context_image_token"]) == (
        "<img>", "</img>", "<IMG_CONTEXT>")

    model, processor = load_policy(str(out))
    assert isinstance(model, InternVLForConditionalGeneration)
    # torchvision is missing here: the stock class without its video part (models/families.image_only)
    assert type(processor).__name__ == "InternVLProcessor" and getattr(type(processor), "image_only", False)
    assert processor.image_processor.crop_to_patches and processor.image_processor.max_patches == 12
    assert processor.image_token_id == model.config.image_token_id == 6
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    # the release's own turn format, with the image placeholder before the question
    assert processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>user\n<IMG_CONTEXT>\nWhat?<|im_end|>\n<|im_start|>assistant\n<think>\n")
    turns = [{"role": "system", "content": "Be brief."},  # string content passes through as it was
             {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}]
    assert processor.apply_chat_template(turns, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<IMG_CONTEXT>\n<IMG_CONTEXT>\nSame?<|im_end|>\n"
        "<|im_start|>assistant\nyes<|im_end|>\n")


def _error(tmp_path, edit) -> str:
    src = tmp_path / "src"
    make_skywork_folder(src)
    edit(src)
    with pytest.raises((ValueError, FileNotFoundError, FileExistsError)) as e:
        convert(str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing half-written
    return str(e.value)


def _edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2))


def _resave(shard: Path, edit):
    from safetensors.torch import load_file

    tensors = load_file(str(shard))
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})


def test_bad_folders_get_errors_naming_the_file(tmp_path):
    msg = _error(tmp_path / "a", lambda s: _edit_json(s / "config.json", model_type="internvl_chat"))
    assert re.search(r"src/config\.json:\d+: model_type is 'internvl_chat', not 'skywork_chat'", msg), msg
    msg = _error(tmp_path / "b", lambda s: _edit_json(s / "config.json", ps_version="v1"))
    assert "config.json: ps_version 'v1'" in msg
    msg = _error(tmp_path / "g", lambda s: (s / "config.json").write_text('{\n  "model_type": "skywork_chat",\n  oops\n}'))
    assert re.search(r"src/config\.json:3: not valid JSON", msg), msg
    shard1 = "model-00001-of-00002.safetensors"
    msg = _error(tmp_path / "c", lambda s: _resave(s / shard1, lambda t: t.update({"vision_model.extra.weight": torch.ones(2)})))
    assert shard1 in msg and "vision_model.extra.weight" in msg and "not in the Skywork R1V layout" in msg
    msg = _error(tmp_path / "d", lambda s: _resave(s / shard1, lambda t: t.pop("mlp1.3.weight")))
    assert "lack 1 tensors" in msg and "model.multi_modal_projector.linear_2.weight" in msg
    msg = _error(tmp_path / "e", lambda s: _resave(s / shard1, lambda t: t.update({"mlp1.1.bias": torch.ones(5)})))
    assert shard1 in msg and "mlp1.1.bias has shape (5,)" in msg and "(48,)" in msg
    msg = _error(tmp_path / "h", lambda s: (_drop_video_token(s), _edit_json(s / "config.json", llm_config={
        **json.loads((s / "config.json").read_text())["llm_config"], "vocab_size": 300})))
    assert "image tokens {'<video>': 300} have no row in the LLM's embedding (llm_config.vocab_size 300)" in msg
    out = tmp_path / "f" / "out"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        convert(str(tmp_path / "a" / "src"), str(out))


@pytest.mark.slow
def test_cli_convert_then_sft_fit_and_export(tiny_data, tmp_path):
    """The converted folder trains through ``cli.py fit`` (SFT, then GRPO from it) and exports to a
    stock-loadable folder. The task's 32 px images are one tile each."""
    src, hf = tmp_path / "skywork", tmp_path / "hf"
    make_skywork_folder(src)

    def cli(*args):
        res = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=tmp_path, capture_output=True,
                             text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return res

    assert "as InternVLForConditionalGeneration" in cli("convert", "--src", str(src), "--out", str(hf)).stdout
    run = tmp_path / "run"
    config = tmp_path / "sft.yaml"
    config.write_text((ROOT / "configs/tiny/sft.yaml").read_text()
                      .replace("runs/sft", str(run)).replace("data/tiny/", f"{tiny_data}/"))
    fit = cli("fit", "--config", str(config), "--model.model", str(hf), "--trainer.max_steps", "3",
              "--data.batch_size", "4", "--trainer.log_every_n_steps", "1", "--trainer.check_val_every_n_epoch",
              "100", "--model.lr", "1e-3")
    assert "trainable parts ['vision', 'connector', 'llm']" in fit.stdout
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    grpo_run = tmp_path / "grpo"
    grpo = tmp_path / "grpo.yaml"
    grpo.write_text((ROOT / "configs/tiny/grpo.yaml").read_text()
                    .replace("runs/grpo", str(grpo_run)).replace("data/tiny/", f"{tiny_data}/"))
    fit = cli("fit", "--config", str(grpo), "--model.model", str(hf), "--model.init_ckpt", str(ckpt),
              "--trainer.max_steps", "2", "--model.group_size", "2", "--data.batch_size", "2",
              "--model.engine.init_args.max_new_tokens", "8", "--trainer.log_every_n_steps", "1")
    assert "trainable parts ['connector', 'llm']" in fit.stdout
    assert (grpo_run / "checkpoints" / "last.ckpt").exists()
    out = tmp_path / "exported"
    cli("export", "--ckpt_path", str(ckpt), "--out", str(out))
    exported_proc = json.loads((out / "processor_config.json").read_text())
    assert exported_proc["processor_class"] == "InternVLProcessor"
    assert exported_proc["video_processor"] == json.loads((hf / "processor_config.json").read_text())["video_processor"]
    exported = AutoModelForImageTextToText.from_pretrained(str(out))
    start = AutoModelForImageTextToText.from_pretrained(str(hf))
    assert type(exported) is InternVLForConditionalGeneration
    changed = [n for n, p in exported.state_dict().items() if not torch.equal(p, start.state_dict()[n])]
    assert any(n.startswith("model.language_model") for n in changed)  # trained weights, not the converted ones
    model, processor = load_policy(str(out))
    assert processor.image_processor.max_patches == 12 and processor.image_processor.crop_to_patches


def _drop_video_token(folder: Path):
    """Remove ``<video>`` from the tokenizer, as InternVL's original tokenizers lack it (id 7 left unused)."""
    path = folder / "tokenizer.json"
    tok = json.loads(path.read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<video>"]
    del tok["model"]["vocab"]["<video>"]
    path.write_text(json.dumps(tok))


def test_a_missing_image_token_is_added_within_the_embedding(tmp_path):
    from transformers import AutoTokenizer

    make_skywork_folder(tmp_path / "src")
    _drop_video_token(tmp_path / "src")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "src")).convert_tokens_to_ids("<video>") == 3  # <unk>
    convert(str(tmp_path / "src"), str(tmp_path / "hf"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    # 300 tokens are left (ids 0-300 but 7); the new one takes id 300, a row of the 311-row embedding
    assert tok.video_token == "<video>" and tok.video_token_id == 300
    assert tok("<video> red<IMG_CONTEXT>").input_ids[0] == 300 and tok.context_image_token_id == 6


def test_config_and_names_of_an_r1v2_sized_release():
    """The mapping on R1V2-38B's sizes (InternViT-6B-448px-V2_5 + QwQ-32B), checked by hand."""
    from lightning_r1v2.jobs.convert import internvl_config, target_names

    sky = {"model_type": "skywork_chat", "downsample_ratio": 0.5, "ps_version": "v2", "select_layer": -1,
           "force_image_size": 448, "torch_dtype": "bfloat16",
           "vision_config": {"hidden_size": 3200, "num_hidden_layers": 45, "num_attention_heads": 25,
                             "intermediate_size": 12800, "image_size": 448, "patch_size": 14, "norm_type": "rms_norm",
                             "qk_normalization": True, "qkv_bias": False, "use_flash_attn": True},
           "llm_config": {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 5120, "num_hidden_layers": 64,
                          "attn_implementation": "flash_attention_2", "torch_dtype": "bfloat16"}}
    cfg = internvl_config(sky)
    assert cfg["image_seq_length"] == 256  # (448 / 14)^2 = 1024 patches, pixel shuffle 0.5 keeps a quarter
    assert cfg["vision_config"]["use_qk_norm"] and not cfg["vision_config"]["attention_bias"]
    assert cfg["vision_config"]["norm_type"] == "rms_norm" and cfg["tie_word_embeddings"] is False
    assert cfg["dtype"] == "bfloat16" and not {"attn_implementation", "torch_dtype"} & set(cfg["text_config"])
    assert target_names("vision_model.encoder.layers.44.attn.qkv.weight") == [
        f"vision_tower.encoder.layer.44.attention.{p}_proj.weight" for p in "qkv"]
    assert target_names("vision_model.encoder.layers.3.ls2") == ["vision_tower.encoder.layer.3.lambda_2"]
    assert target_names("mlp1.3.bias") == ["multi_modal_projector.linear_2.bias"]
    assert target_names("mlp1.2.weight") is None  # the GELU holds no weights
    assert target_names("language_model.lm_head.weight") == ["language_model.lm_head.weight"]
    with pytest.raises(ValueError, match="only Qwen2-family"):
        internvl_config({**sky, "llm_config": {**sky["llm_config"], "model_type": "internlm2"}})
