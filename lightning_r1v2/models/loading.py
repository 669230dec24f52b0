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
    processor = load_policy_processor(name_or_path, tiny_config=tiny_config)
    model = load_policy_model(name_or_path, processor, dtype=dtype, tiny_config=tiny_config, seed=seed)
    return model, processor


def load_policy_processor(name_or_path: str = "tiny", tiny_config=None):
    """The processor of ``load_policy(name_or_path)``, without the model (cheap: no weights are read).

    ``PolicyModule`` loads it in ``__init__`` even when the model itself waits for
    ``configure_model`` (``defer_init``): the DataModule needs it in ``setup``, which Lightning
    runs before ``configure_model``.
    """
    if name_or_path == "tiny":
        from .tiny import build_processor

        return build_processor(tiny_config)
    return load_processor(str(_model_folder(name_or_path)))


def load_policy_model(name_or_path: str, processor, dtype: str | None = None, tiny_config=None, seed: int = 0):
    """The model of ``load_policy(name_or_path)``; ``processor`` is its ``load_policy_processor``.

    A folder loads with ``AutoModelForImageTextToText.from_pretrained(local_files_only=True)``, so
    under a live ``transformers.integrations.HfDeepSpeedConfig`` with ZeRO stage 3 the weights are
    partitioned while they load (``PolicyModule.configure_model`` sets that up).
    """
    if name_or_path == "tiny":
        from .tiny import build_tiny_model

        model = build_tiny_model(tiny_config, processor.tokenizer, seed=seed)
        if dtype:
            model = model.to(getattr(torch, dtype))
        return model
    from transformers import AutoModelForImageTextToText

    path = _model_folder(name_or_path)
    kwargs = {"local_files_only": True}
    if dtype:
        kwargs["dtype"] = getattr(torch, dtype)
    return AutoModelForImageTextToText.from_pretrained(str(path), **kwargs)


def _model_folder(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model path {name_or_path!r} is not a folder; use 'tiny' for the embedded default or a local "
            "checkpoint folder (models are never downloaded)"
        )
    return path


def is_zero3_partitioned(model: nn.Module) -> bool:
    """True when ``model``'s parameters are DeepSpeed ZeRO-3 partitioned (built under ``deepspeed.zero.Init``).

    A partitioned parameter holds only this rank's slice (its ``.data`` is an empty ``[0]`` tensor
    outside a gather) and carries DeepSpeed's ``ds_id`` / ``ds_shape`` / ``ds_numel`` attributes.
    """
    return any(hasattr(p, "ds_id") for p in model.parameters())


def param_numel(p: torch.Tensor) -> int:
    """Elements of a parameter, ZeRO-3 partitioned or not (``ds_numel``: the full, unpartitioned count)."""
    return int(getattr(p, "ds_numel", p.numel()))


def param_ndim(p: torch.Tensor) -> int:
    """Dimensions of a parameter, ZeRO-3 partitioned or not (``ds_shape``: the full shape)."""
    return len(getattr(p, "ds_shape", p.shape))


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
        counts["trainable" if p.requires_grad else "frozen"] += param_numel(p)  # full counts under ZeRO-3 too
    for part, ms in parts.items():
        counts[f"params/{part}"] = sum(param_numel(p) for m in ms for p in m.parameters())
    log.info(
        "trainable parts %s: %s trainable, %s frozen parameters",
        list(trainable), f"{counts['trainable']:,}", f"{counts['frozen']:,}",
    )
    return counts
