"""Turning records into model inputs: chat prompts, image tokens, SFT labels.

Prompts are rendered with the processor's chat template (one image entry per image, then the
question) and expanded by the processor, which replaces each image placeholder with the image's
tokens. Each record is encoded on its own, so a batch carries per-record model inputs for any
family: ``media[i]`` holds record ``i``'s pixel values (any number of images, any number of tiles
or patches per image) and image grids; per-token inputs (``token_inputs``: Gemma3's
``token_type_ids``, Qwen's ``mm_token_type_ids``) are padded with the prompt
(``models/inputs.py``). Prompts are never truncated: a prompt over the limit is dropped (and
counted) when the dataset is built, so no image placeholder is ever cut (TRL PR 5927).
"""
from __future__ import annotations

import torch
from PIL import Image

from ..models.inputs import policy_io, split_encoding
from .sources import fit_pixels, open_image

IGNORE_INDEX = -100


def record_images(record: dict) -> list:
    """The record's image entries, one per image (``image``: a path or an embedded-image reference
    of ``sources.py``, a list of them, or absent/None: text only)."""
    img = record.get("image")
    if img is None:
        return []
    return list(img) if isinstance(img, list) else [img]


def prompt_text(processor, record: dict) -> str:
    """The chat-formatted prompt of a record, ending with the assistant turn's header.

    Raises ``ValueError`` naming the record's ``file:line`` when the rendered prompt holds a
    different number of image placeholders than the record has images (e.g. a literal
    ``<image>`` typed in the question), instead of a model error deep inside a forward pass.
    """
    n_images = len(record_images(record))
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": record["question"]}]
    messages = [{"role": "user", "content": content}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    placeholder = policy_io(processor).image_placeholder
    if placeholder and text.count(placeholder) != n_images:
        where = record.get("_source", record.get("id", "record"))
        raise ValueError(f"{where}: the prompt holds {text.count(placeholder)} image placeholder(s) "
                         f"{placeholder!r} but the record has {n_images} image(s) (is {placeholder!r} typed in "
                         "the question?)")
    return text


def load_images(record: dict) -> list[Image.Image]:
    """The record's images, decoded now (from files or the dataset's table), RGB, and scaled
    (aspect kept) into ``record["_resize"] = [min_pixels, max_pixels]`` when the DataModule set it."""
    lo, hi = record.get("_resize") or (0, 0)
    out = []
    for p in record_images(record):
        with open_image(p) as im:
            im = im.convert("RGB")
        size = fit_pixels(im.size, lo, hi)
        out.append(im if size == im.size else im.resize(size, Image.Resampling.BICUBIC))
    return out


def encode_record(processor, record: dict) -> tuple[list[int], dict, dict]:
    """One record's prompt: token ids, per-token inputs (name -> list) and media (name -> tensor)."""
    images = load_images(record)
    kw = {"images": images} if images else {}
    enc = processor(text=[prompt_text(processor, record)], return_tensors="pt", **kw)
    tokens, media = split_encoding(enc)
    ids = enc["input_ids"][0][enc["attention_mask"][0].bool()]
    keep = enc["attention_mask"][0].bool()
    return ids.tolist(), {k: v[0][keep].tolist() for k, v in tokens.items()}, media


def pad_rows(ids: list[list[int]], tokens: list[dict], pad_id: int, side: str) -> dict:
    """``input_ids``, ``attention_mask`` ``[n, T]`` and ``token_inputs`` (each ``[n, T]``, 0 on padding)."""
    n, width = len(ids), max(len(s) for s in ids)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)  # [n, T]
    attention_mask = torch.zeros((n, width), dtype=torch.long)  # [n, T]
    token_inputs = {k: torch.zeros((n, width), dtype=torch.long) for k in (tokens[0] if tokens else {})}
    for i, s in enumerate(ids):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        input_ids[i, cols] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, cols] = 1
        for k, t in token_inputs.items():
            t[i, cols] = torch.tensor(tokens[i][k], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_inputs": token_inputs}


def encode_prompts(processor, records: list[dict], padding_side: str = "left") -> dict:
    """Batch-encode the prompts of ``records``: ``input_ids``, ``attention_mask``, ``token_inputs``
    (padded like the ids) and ``media`` (one dict per record)."""
    rows = [encode_record(processor, r) for r in records]
    batch = pad_rows([r[0] for r in rows], [r[1] for r in rows], policy_io(processor).pad_id, padding_side)
    batch["media"] = [r[2] for r in rows]
    return batch


def response_ids(processor, response: str) -> list[int]:
    """Token ids of a response followed by the chat template's end-of-turn token."""
    ids = processor.tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids + [policy_io(processor).end_of_turn_id]


def prompt_response_batch(processor, records: list[dict], responses: list[str]) -> dict:
    """Prompt + response + end of turn per row, right padded; ``labels`` hold the response tokens
    (end of turn included) and -100 on prompt, image and padding tokens; ``media`` per row."""
    seqs, labels, tokens, media = [], [], [], []
    for rec, resp in zip(records, responses):
        p, tok_in, m = encode_record(processor, rec)
        r = response_ids(processor, resp)
        seqs.append(p + r)
        labels.append([IGNORE_INDEX] * len(p) + r)
        tokens.append({k: v + [0] * len(r) for k, v in tok_in.items()})
        media.append(m)
    batch = pad_rows(seqs, tokens, policy_io(processor).pad_id, "right")
    label_t = torch.full_like(batch["input_ids"], IGNORE_INDEX)  # [n, T]
    for i, lab in enumerate(labels):
        label_t[i, : len(lab)] = torch.tensor(lab)
    batch["labels"] = label_t
    batch["media"] = media
    return batch


class PromptCollator:
    """Records -> left-padded prompts for generation; keeps the records alongside."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, records: list[dict]) -> dict:
        batch = encode_prompts(self.processor, records, padding_side="left")
        batch["records"] = records
        return batch


class SFTCollator:
    """Records with a ``response`` -> prompt + response, loss only on response tokens.

    ``labels`` equal ``input_ids`` on response tokens (including the closing end-of-turn token)
    and ``-100`` on prompt, image and padding tokens. Right padding.
    """

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, records: list[dict]) -> dict:
        for rec in records:
            if not rec.get("response"):
                raise ValueError(f"{rec.get('_source', rec.get('id'))}: SFT needs a 'response' field")
        batch = prompt_response_batch(self.processor, records, [r["response"] for r in records])
        batch["records"] = records
        return batch
