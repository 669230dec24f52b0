"""What a policy's batches carry to its model, for any family.

A processor's outputs fall in two kinds, told apart by shape:
- *token inputs*, one value per token (``input_ids``, ``attention_mask``, Qwen's
  ``mm_token_type_ids``, Gemma3's ``token_type_ids``): padded with the prompt;
- *media*, one row per image, tile or patch (``pixel_values``, ``image_grid_thw``,
  ``image_sizes``): kept per record (``media[i]`` is record ``i``'s, any number of images and
  tiles) and concatenated along dim 0 for exactly the rows of a forward pass.

``PolicyIO`` (one per processor, ``policy_io(processor)``) also knows the stop tokens (the
generation config's list, the tokenizer's EOS and the chat template's end of turn), the tokens a
completion must never contain, and whether the model numbers its own positions.
"""
from __future__ import annotations

import logging

import torch

from .families import Family, family_of_processor

log = logging.getLogger("lightning_r1v2.models")

TEXT_KEYS = ("input_ids", "attention_mask")
TOKEN_KEYS = ("token_type_ids", "mm_token_type_ids")  # per-token processor outputs the models take


def generation_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate`` numbers them: left padding skipped, the first real token at 0."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


class PolicyIO:
    """Family facts about a processor's model, read once (``policy_io(processor)``).

    Attributes:
        family: the ``Family`` adapter.
        pad_id: padding token id.
        end_of_turn_id: the token the chat template closes an assistant turn with (SFT
            responses end with it; generation stops at it).
        stop_ids: every id that ends a completion (end of turn, tokenizer EOS, the checkpoint's
            ``generation_config.eos_token_id`` list).
        blocked_ids: ids a completion must never contain (image/video placeholders, image
            start/end markers, padding), from the tokenizer, the processor and the model config.
        image_placeholder: the text the chat template puts per image (checked against the
            record's image count before anything is encoded).
    """

    def __init__(self, processor, generation_eos=None, config=None):
        self.processor = processor
        self.family: Family = family_of_processor(processor)
        tok = processor.tokenizer
        self.tokenizer = tok
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.end_of_turn_id = _end_of_turn_id(processor)
        stops = [self.end_of_turn_id, tok.eos_token_id]
        stops += generation_eos if isinstance(generation_eos, (list, tuple)) else [generation_eos]
        self.stop_ids = sorted({int(i) for i in stops if isinstance(i, int) and i >= 0})
        self.image_placeholder = _image_placeholder(processor)
        self.blocked_ids = self._blocked(config)

    def _blocked(self, config) -> list[int]:
        tok, proc = self.tokenizer, self.processor
        names = ("context_image_token", "start_image_token", "end_image_token", "video_token", "image_token",
                 "boi_token", "eoi_token", "vision_start_token", "vision_end_token", "pad_token")
        ids: set = set()
        for holder in (tok, proc):
            for n in names:
                i = getattr(holder, f"{n}_id", None)
                if isinstance(i, int):
                    ids.add(i)
                t = getattr(holder, n, None)
                if isinstance(t, str) and t in tok.get_vocab():
                    ids.add(tok.convert_tokens_to_ids(t))
        if config is not None:
            for n in ("image_token_id", "image_token_index", "video_token_id", "vision_start_token_id",
                      "vision_end_token_id", "boi_token_index", "eoi_token_index"):
                i = getattr(config, n, None)
                if isinstance(i, int):
                    ids.add(i)
        ids.add(self.pad_id)
        return sorted(i for i in ids if isinstance(i, int) and 0 <= i < len(tok) and i not in self.stop_ids)

    # ---------------------------------------------------------------- batches
    def model_inputs(self, input_ids, attention_mask, media: list[dict] | None = None,
                     token_inputs: dict | None = None, dtype=None) -> dict:
        """Keyword arguments of a forward pass over rows ``input_ids`` ``[n, T]``.

        ``media`` holds each row's own media dict (concatenated here in row order); ``token_inputs``
        are per-token tensors ``[n, T']`` aligned on the left with ``input_ids`` (a prompt's),
        padded with 0 on the right up to ``T`` (the completion's tokens are text). Position ids
        are passed as ``generate`` numbers them, except for families that number their own (M-RoPE).
        """
        kw = {"input_ids": input_ids, "attention_mask": attention_mask}
        if not self.family.own_positions:
            kw["position_ids"] = generation_position_ids(attention_mask)
        kw.update(concat_media(media or [], dtype))
        T = input_ids.shape[1]
        for k, v in (token_inputs or {}).items():
            kw[k] = torch.nn.functional.pad(v, (0, T - v.shape[1])) if v.shape[1] < T else v[:, :T]
        return kw


def concat_media(media: list[dict], dtype=None) -> dict:
    """One media dict from the rows' dicts: each key's tensors concatenated along dim 0, in row
    order (rows without a key, e.g. text-only records, contribute nothing); floating-point
    pixels cast to ``dtype``."""
    keys: list[str] = []
    for m in media:
        keys.extend(k for k in m if k not in keys)
    out = {}
    for k in keys:
        t = torch.cat([m[k] for m in media if k in m])
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[k] = t
    return out


def split_encoding(enc: dict) -> tuple[dict, dict]:
    """A one-record processor output -> ``(token_inputs, media)``: per-token tensors ``[1, T]``
    (besides ids and mask) and per-image tensors (everything else)."""
    tokens, media = {}, {}
    for k, v in enc.items():
        if k in TEXT_KEYS or not isinstance(v, torch.Tensor):
            continue
        if k in TOKEN_KEYS:
            tokens[k] = v
        else:
            media[k] = v
    return tokens, media


def policy_io(processor) -> PolicyIO:
    """The ``PolicyIO`` of ``processor`` (built once, kept on the processor)."""
    io = getattr(processor, "_r1v2_io", None)
    if io is None:
        io = PolicyIO(processor, getattr(processor, "_r1v2_generation_eos", None),
                      getattr(processor, "_r1v2_model_config", None))
        processor._r1v2_io = io
    return io


def _end_of_turn_id(processor) -> int:
    """The first token the chat template writes after an assistant message's text."""
    tok = processor.tokenizer
    marker = "R1V2MARKER"
    msgs = [{"role": "user", "content": [{"type": "text", "text": "q"}]},
            {"role": "assistant", "content": [{"type": "text", "text": marker}]}]
    try:
        text = processor.apply_chat_template(msgs, tokenize=False)
        tail = text[text.rindex(marker) + len(marker):]
        ids = tok(tail, add_special_tokens=False)["input_ids"] if tail else []
    except Exception as e:  # a template that cannot render an assistant turn
        log.warning("chat template has no assistant turn (%s): responses end with the tokenizer's EOS", e)
        ids = []
    specials = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}))
    for i in ids:
        if i in specials:
            return int(i)
    return int(tok.eos_token_id)


def _image_placeholder(processor) -> str | None:
    """What the chat template writes for one image, found by rendering one."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}]
    plain = [{"role": "user", "content": [{"type": "text", "text": "q"}]}]
    try:
        a = processor.apply_chat_template(msgs, tokenize=False)
        b = processor.apply_chat_template(plain, tokenize=False)
    except Exception:
        return None
    for name in ("image_token", "boi_token", "context_image_token"):
        for holder in (processor, processor.tokenizer):
            t = getattr(holder, name, None)
            if isinstance(t, str) and t and a.count(t) == b.count(t) + 1:
                return t
    return None
