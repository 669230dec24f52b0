"""Tiny random-init folders of the real VLM families, built in code (no downloads).

Each folder holds what a user's checkpoint holds: the family's real config and model classes
(``save_pretrained``), a real tokenizer class (byte-level BPE for the Qwen-based families, byte
fallback for Gemma) with the family's special tokens and a chat template in the family's shape,
the family's image processor and processor config. A few hundred thousand parameters each.

``build_family(name, folder)`` writes one; ``FAMILIES`` lists the names.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from lightning_r1v2.models.families import image_only

FAMILIES = ("internvl", "llava", "gemma3", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# chat templates in each family's shape: images as placeholders in the user turn, the assistant
# turn closed by the family's end-of-turn token
_QWEN_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ IMAGE }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
_GEMMA_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
_IMAGE_PLACEHOLDER = {
    "internvl": "'<IMG_CONTEXT>\\n'",
    "llava": "'<image>\\n'",
    "qwen2_vl": "'<|vision_start|><|image_pad|><|vision_end|>'",
    "qwen2_5_vl": "'<|vision_start|><|image_pad|><|vision_end|>'",
    "qwen3_vl": "'<|vision_start|><|image_pad|><|vision_end|>'",
}
_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def _byte_level_vocab() -> dict[str, int]:
    from tokenizers import pre_tokenizers

    return {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}


def qwen_tokenizer(extra: dict[str, str], eos: str = "<|im_end|>", template: str = _QWEN_TEMPLATE):
    """A ``Qwen2Tokenizer`` (byte-level BPE, no merges) with Qwen's specials plus ``extra`` (attr -> token)."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    tok = Qwen2Tokenizer(vocab=_byte_level_vocab(), merges=[], unk_token=None, eos_token=eos,
                         pad_token="<|endoftext|>", extra_special_tokens=dict(extra))
    tok.add_tokens([AddedToken(t, special=True) for t in _QWEN_SPECIALS + list(extra.values())])
    tok.chat_template = template
    return tok


def gemma_tokenizer():
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    for c in "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789?.,:{}\\()":
        vocab.setdefault(c, len(vocab))
    extra = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = GemmaTokenizer(vocab=vocab, merges=[], extra_special_tokens=extra)
    tok.add_tokens([AddedToken(t, special=True) for t in
                    ["<start_of_turn>", "<end_of_turn>", "<think>", "</think>", *extra.values()]])
    tok.chat_template = _GEMMA_TEMPLATE
    return tok


def _text(vocab: int, tok, **kw) -> dict:
    base = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    base.update(kw)
    return base


def build_family(name: str, folder, seed: int = 0) -> Path:
    """Write a tiny random ``name`` checkpoint (model, tokenizer, processor) to ``folder``."""
    import transformers as tf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if name == "gemma3":
        tok = gemma_tokenizer()
    else:
        extra = {
            "internvl": {"start_image_token": "<img>", "end_image_token": "</img>",
                         "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
            "llava": {"image_token": "<image>"},
        }.get(name, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                     "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"})
        tok = qwen_tokenizer(extra, template=_QWEN_TEMPLATE.replace("IMAGE", _IMAGE_PLACEHOLDER[name]))
    V = len(tok)
    ids = tok.convert_tokens_to_ids
    if name == "internvl":
        config = tf.InternVLConfig(
            vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                               image_size=[16, 16], patch_size=[8, 8]),
            text_config=_text(V, tok, model_type="qwen2"),
            image_token_id=ids("<IMG_CONTEXT>"), image_seq_length=1, downsample_ratio=0.5)
        model_cls = tf.InternVLForConditionalGeneration
        ip = tf.GotOcr2ImageProcessorPil(size={"height": 16, "width": 16}, crop_to_patches=True,
                                         min_patches=1, max_patches=4)
        proc = image_only(tf.InternVLProcessor)(image_processor=ip, tokenizer=tok, video_processor=None, image_seq_length=1,
                                    chat_template=tok.chat_template)
    elif name == "llava":
        config = tf.LlavaConfig(
            vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=8),
            text_config=_text(V, tok, model_type="qwen2"),
            image_token_index=ids("<image>"), image_seq_length=4,
            vision_feature_select_strategy="full", vision_feature_layer=-1)
        model_cls = tf.LlavaForConditionalGeneration
        ip = tf.SiglipImageProcessorPil(size={"height": 16, "width": 16})
        proc = tf.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="full",
                                 num_additional_image_tokens=0, image_token="<image>", chat_template=tok.chat_template)
    elif name == "gemma3":
        config = tf.Gemma3Config(
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=16, patch_size=4),
            text_config=_text(V, tok, head_dim=8, query_pre_attn_scalar=8, sliding_window=64,
                              bos_token_id=tok.bos_token_id),
            mm_tokens_per_image=4, boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
            image_token_index=ids("<image_soft_token>"))
        model_cls = tf.Gemma3ForConditionalGeneration
        ip = tf.Gemma3ImageProcessorPil(size={"height": 16, "width": 16})
        proc = tf.Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4, chat_template=tok.chat_template)
    else:  # the Qwen VL family: M-RoPE positions, patches merged 2x2 by visual.merger
        mm = dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                  vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
        if name == "qwen2_vl":
            vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, patch_size=8)
            config, model_cls = tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration
        elif name == "qwen2_5_vl":
            vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=8,
                          out_hidden_size=32, window_size=32, fullatt_block_indexes=[1])
            config, model_cls = tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration
        else:
            vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=8,
                          out_hidden_size=32, num_position_embeddings=16, deepstack_visual_indexes=[0])
            rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "mrope_interleaved": True}
            config, model_cls = tf.Qwen3VLConfig, tf.Qwen3VLForConditionalGeneration
        text = _text(V, tok, rope_parameters=rope)
        if name == "qwen3_vl":
            text["head_dim"] = 8
        config = config(vision_config=vision, text_config=text, **mm)
        ip = tf.Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2,
                                         size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32})
        proc_cls = tf.Qwen3VLProcessor if name == "qwen3_vl" else (
            tf.Qwen2_5_VLProcessor if name == "qwen2_5_vl" else tf.Qwen2VLProcessor)
        proc = image_only(proc_cls)(image_processor=ip, tokenizer=tok, chat_template=tok.chat_template)
    config.tie_word_embeddings = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.generation_config.eos_token_id = [tok.eos_token_id]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    (folder / "tiny_family.json").write_text(json.dumps({"family": name}))
    return folder
