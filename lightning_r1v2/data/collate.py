"""Turning records into model inputs: chat prompts, image tokens, SFT labels.

Prompts are rendered with the processor's chat template (one image entry per image, then the
question) and expanded by the processor, which replaces each image placeholder with the image's
tokens. Prompts are never truncated: a prompt over the limit is dropped (and counted) when the
dataset is built, so no image placeholder is ever cut (TRL PR 5927).
"""
from __future__ import annotations

import torch
from PIL import Image

IGNORE_INDEX = -100


def prompt_text(processor, record: dict) -> str:
    """The chat-formatted prompt of a record, ending with the assistant turn's header."""
    n_images = len(record["image"]) if isinstance(record["image"], list) else 1
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": record["question"]}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def load_images(record: dict) -> list[Image.Image]:
    paths = record["image"] if isinstance(record["image"], list) else [record["image"]]
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out


def encode_prompts(processor, records: list[dict], padding_side: str = "left") -> dict:
    """Batch-encode the prompts of ``records``: ``input_ids``, ``attention_mask``, ``pixel_values``."""
    texts = [prompt_text(processor, r) for r in records]
    images = [im for r in records for im in load_images(r)]
    tok = processor.tokenizer
    old_side = tok.padding_side
    tok.padding_side = padding_side
    try:
        enc = processor(images=images, text=texts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = old_side
    return dict(enc)


def response_ids(tokenizer, response: str) -> list[int]:
    """Token ids of a response followed by the end-of-turn token."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id]


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
        tok = self.processor.tokenizer
        enc = encode_prompts(self.processor, records, padding_side="left")
        seqs, labels = [], []
        for i, rec in enumerate(records):
            if not rec.get("response"):
                raise ValueError(f"{rec.get('_source', rec.get('id'))}: SFT needs a 'response' field")
            p = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
            r = response_ids(tok, rec["response"])
            seqs.append(p + r)
            labels.append([IGNORE_INDEX] * len(p) + r)
        width = max(len(s) for s in seqs)
        pad = tok.pad_token_id
        input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)  # [B, T]
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)  # [B, T]
        label_t = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)  # [B, T]
        for i, (s, l) in enumerate(zip(seqs, labels)):
            input_ids[i, : len(s)] = torch.tensor(s)
            attention_mask[i, : len(s)] = 1
            label_t[i, : len(l)] = torch.tensor(l)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": label_t,
            "pixel_values": enc["pixel_values"],
            "records": records,
        }
