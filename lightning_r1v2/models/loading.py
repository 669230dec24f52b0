"""Building or loading the policy, and choosing which of its parts train.

``load_policy("tiny")`` builds the embedded default in code; ``load_policy("/path/to/folder")``
loads a real checkpoint offline (``AutoModelForImageTextToText`` + ``AutoProcessor`` with
``local_files_only=True``): an InternVL-family (``-hf`` layout), Qwen2.5-VL or Skywork R1V folder.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("lightning_r1v2.models")

PARTS = ("vision", "connector", "llm")
# Attribute names of each part across the architectures we load (InternVL, Qwen2.5-VL, LLaVA-like).
_PART_ATTRS = {
    "vision": ("vision_tower", "visual", "vision_model"),
    "connector": ("multi_modal_projector", "mlp1", "connector", "merger"),
    "llm": ("language_model", "lm_head"),
}


def load_processor(path: str):
    """The processor saved in ``path``; our image-only InternVL processor where torchvision is missing."""
    from transformers import AutoProcessor

    from .tiny import TinyVLProcessor

    cfg_file = Path(path) / "processor_config.json"
    model_type = None
    if (Path(path) / "config.json").exists():
        model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    declared = json.loads(cfg_file.read_text()).get("processor_class") if cfg_file.exists() else None
    if declared == "TinyVLProcessor" or (model_type == "internvl" and not _has_torchvision()):
        return TinyVLProcessor.from_pretrained(path, local_files_only=True)
    return AutoProcessor.from_pretrained(path, local_files_only=True)


def _has_torchvision() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def load_policy(name_or_path: str = "tiny", dtype: str | None = None, tiny_config=None, seed: int = 0):
    """Return ``(model, processor)``.

    Args:
        name_or_path: ``"tiny"`` for the embedded default, else a local folder.
        dtype: ``"bfloat16"``, ``"float16"``, ``"float32"`` or None (the checkpoint's own).
        tiny_config: a ``TinyVLMConfig`` for the embedded default.
        seed: init seed of the embedded default.
    """
    if name_or_path == "tiny":
        from .tiny import build_processor, build_tiny_model

        processor = build_processor(tiny_config)
        model = build_tiny_model(tiny_config, processor.tokenizer, seed=seed)
        if dtype:
            model = model.to(getattr(torch, dtype))
        return model, processor
    path = Path(name_or_path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model path {name_or_path!r} is not a folder; use 'tiny' for the embedded default or a local "
            "checkpoint folder (models are never downloaded)"
        )
    from transformers import AutoModelForImageTextToText

    kwargs = {"local_files_only": True}
    if dtype:
        kwargs["dtype"] = getattr(torch, dtype)
    model = AutoModelForImageTextToText.from_pretrained(str(path), **kwargs)
    processor = load_processor(str(path))
    return model, processor


def part_modules(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The modules making up each part (vision / connector / llm) of a VLM."""
    found: dict[str, list[nn.Module]] = {p: [] for p in PARTS}
    holders = [model] + [m for m in (getattr(model, "model", None),) if isinstance(m, nn.Module)]
    for part, attrs in _PART_ATTRS.items():
        for holder in holders:
            for a in attrs:
                m = getattr(holder, a, None)
                if isinstance(m, nn.Module) and all(m is not x for x in found[part]):
                    found[part].append(m)
    missing = [p for p, ms in found.items() if not ms]
    if missing:
        raise ValueError(f"cannot find the {missing} part(s) in {type(model).__name__}; known names: {_PART_ATTRS}")
    return found


def set_trainable(model: nn.Module, trainable: list[str] | tuple[str, ...]) -> dict[str, int]:
    """Freeze every parameter outside the ``trainable`` parts; return parameter counts.

    ``trainable`` is a subset of ``("vision", "connector", "llm")`` (R1V2 Table 4: connector only
    gave the released model; R1V3 ends with a connector-only stage). Tied embeddings follow the LLM.
    """
    bad = [p for p in trainable if p not in PARTS]
    if bad or not trainable:
        raise ValueError(f"trainable must be a non-empty subset of {list(PARTS)}, got {list(trainable)}")
    parts = part_modules(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for part in trainable:
        for m in parts[part]:
            for p in m.parameters():
                p.requires_grad_(True)
    counts = {"trainable": 0, "frozen": 0}
    for p in model.parameters():
        counts["trainable" if p.requires_grad else "frozen"] += p.numel()
    for part, ms in parts.items():
        counts[f"params/{part}"] = sum(p.numel() for m in ms for p in m.parameters())
    log.info(
        "trainable parts %s: %s trainable, %s frozen parameters",
        list(trainable), f"{counts['trainable']:,}", f"{counts['frozen']:,}",
    )
    return counts
