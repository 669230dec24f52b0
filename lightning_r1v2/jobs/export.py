"""``cli.py export``: a Lightning checkpoint to a Hugging Face folder (model + processor)."""
from __future__ import annotations

import importlib
from pathlib import Path

import torch


def load_module(ckpt_path: str, map_location: str = "cpu"):
    """The LightningModule saved in ``ckpt_path`` (its class is recorded in the checkpoint)."""
    path = Path(ckpt_path)
    if not path.exists():
        raise FileNotFoundError(f"{ckpt_path}: no such checkpoint")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    target = ckpt.get("r1v2_module_class")
    if not target:
        raise ValueError(f"{ckpt_path}: not a lightning-r1v2 checkpoint (no 'r1v2_module_class' entry)")
    module_name, _, cls_name = target.rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls.load_from_checkpoint(str(path), map_location=map_location)


def export(ckpt_path: str, out: str, dtype: str | None = None) -> str:
    """Write the policy of a checkpoint as a Hugging Face folder that loads with ``from_pretrained``.

    Args:
        ckpt_path: A ``.ckpt`` written by ``cli.py fit``.
        out: Output folder (created).
        dtype: Cast the weights before saving (e.g. ``bfloat16``); None keeps them.
    """
    module = load_module(ckpt_path)
    model = module.model
    if dtype:
        model = model.to(getattr(torch, dtype))
    Path(out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    module.processor.save_pretrained(out)
    print(f"export: wrote model and processor of {ckpt_path} to {out}")
    return out
