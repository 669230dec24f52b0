"""The embedded default: a tiny InternVL-architecture VLM, its tokenizer and processor, built in code.

Nothing is downloaded. The model is transformers' ``InternVLForConditionalGeneration``
(vision tower -> MLP connector -> Qwen2 language model) with a small config and random init.

The tokenizer is a ``PreTrainedTokenizerFast`` over a word-level vocabulary: the words of the
synthetic task (with and without a leading space) are single tokens, and every other printable
ASCII character is a token of its own, so any ASCII text round-trips exactly (decoder ``Fuse``).

The processor is a small subclass of ``InternVLProcessor`` that takes only ``image_processor`` and
``tokenizer``: the stock one always builds a video processor, which imports torchvision, and
torchvision has no CPU build on our machines.
"""
from __future__ import annotations

import string
from dataclasses import dataclass

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

# Special tokens. InternVL's processor reads the image ones from the tokenizer's attributes.
PAD, EOS, BOS_TURN, UNK = "<|endoftext|>", "<|im_end|>", "<|im_start|>", "<unk>"
IMG_START, IMG_END, IMG_CONTEXT, VIDEO = "<img>", "</img>", "<IMG_CONTEXT>", "<video>"
THINK_START, THINK_END = "<think>", "</think>"
SPECIAL_TOKENS = [PAD, EOS, BOS_TURN, UNK, IMG_START, IMG_END, IMG_CONTEXT, VIDEO, THINK_START, THINK_END]

# Words that are single tokens. Everything else falls back to one token per character.
WORDS = (
    "red green blue yellow purple orange grey white black "
    "square squares circle circles triangle triangles shape shapes "
    "zero one two three four five six seven eight nine ten "
    "How how many Which which What what colour color most frequent more fewer than or "
    "Are are is Is there the image in of Answer answer with letter option options "
    "Compare count counts I see so yes no Yes No same total cell cells "
    "Wait But Alternatively Let check think can't cannot see \\boxed{ system user assistant "
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16"
).split()

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<IMG_CONTEXT>\\n' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer: task words as tokens, any other printable ASCII character as a token."""
    pieces = sorted({*WORDS, *(" " + w for w in WORDS)}, key=lambda s: (-len(s), s))
    chars = list(string.printable)  # includes space, \n, \t
    vocab: dict[str, int] = {}
    for tok in SPECIAL_TOKENS + chars + pieces:
        vocab.setdefault(tok, len(vocab))
    # Longest known piece first, then any single character.
    alternation = "|".join(_escape(p) for p in pieces)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(f"{alternation}|[\\s\\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        extra_special_tokens={
            "start_image_token": IMG_START,
            "end_image_token": IMG_END,
            "context_image_token": IMG_CONTEXT,
            "video_token": VIDEO,
            "think_start_token": THINK_START,
            "think_end_token": THINK_END,
            "turn_start_token": BOS_TURN,
        },
        padding_side="left",
        model_max_length=512,
    )
    tok.add_special_tokens({"additional_special_tokens": []})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _escape(piece: str) -> str:
    return "".join("\\" + c if not c.isalnum() and c != " " else c for c in piece)


class TinyVLProcessor(InternVLProcessor):
    """``InternVLProcessor`` without the video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 4, chat_template=None, **kwargs):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            image_seq_length=image_seq_length,
            chat_template=chat_template,
            **kwargs,
        )


@dataclass
class TinyVLMConfig:
    """Size of the embedded tiny VLM.

    The image is ``image_size`` pixels square, cut into ``patch_size`` patches; pixel shuffle
    with ``downsample_ratio`` 0.5 merges 2x2 patches, so the LLM sees
    ``(image_size / patch_size / 2) ** 2`` image tokens: 4 for 32 px and 8 px patches, one per
    cell of the synthetic task's 2x2 grid. (A 3x3 grid with 48 px images gave 9 tokens, and the
    tiny model had not learnt to read them after 1,000 steps; with one token per cell of a 2x2
    grid it reads them within 400.)
    """

    image_size: int = 32
    """Image side in pixels (the synthetic task draws at this size)."""
    patch_size: int = 8
    """ViT patch side in pixels."""
    vision_hidden: int = 64
    """Vision tower width."""
    vision_layers: int = 2
    """Vision tower depth."""
    vision_heads: int = 4
    """Vision attention heads."""
    text_hidden: int = 128
    """Language model width."""
    text_layers: int = 3
    """Language model depth."""
    text_heads: int = 4
    """Language model attention heads."""
    text_kv_heads: int = 2
    """Language model key/value heads (grouped-query attention, as Qwen2)."""
    text_intermediate: int = 384
    """Language model MLP width."""
    max_positions: int = 512
    """Largest sequence length."""

    @property
    def image_seq_length(self) -> int:
        side = self.image_size // self.patch_size
        return (side // 2) ** 2


def build_processor(cfg: TinyVLMConfig | None = None) -> TinyVLProcessor:
    cfg = cfg or TinyVLMConfig()
    tokenizer = build_tokenizer()
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": cfg.image_size, "width": cfg.image_size},
        crop_to_patches=False,
        do_convert_rgb=True,
    )
    return TinyVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=cfg.image_seq_length,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(cfg: TinyVLMConfig | None = None, tokenizer=None, seed: int = 0) -> InternVLForConditionalGeneration:
    """A randomly initialised tiny ``InternVLForConditionalGeneration`` (about 0.8M parameters)."""
    import torch

    cfg = cfg or TinyVLMConfig()
    tokenizer = tokenizer or build_tokenizer()
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=cfg.vision_hidden,
            num_hidden_layers=cfg.vision_layers,
            num_attention_heads=cfg.vision_heads,
            intermediate_size=cfg.vision_hidden * 4,
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            use_mean_pooling=True,
        ),
        text_config=dict(
            model_type="qwen2",
            vocab_size=len(tokenizer),
            hidden_size=cfg.text_hidden,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            num_key_value_heads=cfg.text_kv_heads,
            intermediate_size=cfg.text_intermediate,
            max_position_embeddings=cfg.max_positions,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.convert_tokens_to_ids(BOS_TURN),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT),
        image_seq_length=cfg.image_seq_length,
        downsample_ratio=0.5,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):  # the init seed must not reset the run's RNG (seed_everything)
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
