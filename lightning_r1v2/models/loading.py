"""Building or loading the policy, and choosing which of its parts train.

``load_policy("tiny")`` builds the embedded default in code; ``load_policy("/path/to/folder")``
loads a real checkpoint offline (``AutoModelForImageTextToText`` + the family's processor with
``local_files_only=True``): any family of ``models/families.py`` (InternVL ``-hf`` layout, LLaVA,
Gemma3, Qwen2-VL, Qwen2.5-VL, Qwen3-VL; a Skywork R1V release folder after ``cli.py convert``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("lightning_r1v2.models")

PARTS = ("vision", "connector", "llm")


def load_processor(path: str):
    """The processor saved in ``path``, image-only where its video part needs a missing torchvision.

    The family's stock class (``processor_config.json``'s ``processor_class``) is used; when it
    builds a video processor and torchvision is not installed, the same class without its video
    part (``families.image_only``). The folder's ``generation_config.json`` stop tokens and its
    model config travel with the processor (``models.inputs.policy_io`` reads them).
    """
    import transformers
    from transformers import AutoConfig, AutoProcessor

    from .families import image_only, needs_image_only
    from .tiny import TinyVLProcessor

    from .families import family_of_model_type

    folder = Path(path)
    if (folder / "config.json").exists():  # an unsupported layout fails here, by name, not deep in transformers
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        try:
            family_of_model_type(model_type)
        except ValueError as e:
            raise ValueError(f"{folder / 'config.json'}: {e}") from None
    cfg_file = folder / "processor_config.json"
    declared = json.loads(cfg_file.read_text()).get("processor_class") if cfg_file.exists() else None
    if declared == "TinyVLProcessor":
        processor = TinyVLProcessor.from_pretrained(path, local_files_only=True)
    elif declared and hasattr(transformers, declared) and needs_image_only(getattr(transformers, declared)):
        processor = image_only(getattr(transformers, declared)).from_pretrained(path, local_files_only=True)
    else:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    gen = folder / "generation_config.json"
    if gen.exists():
        processor._r1v2_generation_eos = json.loads(gen.read_text()).get("eos_token_id")
    if (folder / "config.json").exists():
        processor._r1v2_model_config = AutoConfig.from_pretrained(path, local_files_only=True)
    return processor


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


def part_params(model: nn.Module, family=None) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The named parameters of each part (vision / connector / llm), by the family's name prefixes.

    Every parameter belongs to exactly one part; one that matches none is an error naming it.
    """
    from .families import family_of_model_type, part_of

    family = family or family_of_model_type(model.config.model_type)
    found: dict[str, list] = {p: [] for p in PARTS}
    orphans = []
    for name, p in model.named_parameters():
        part = part_of(name, family)
        (found[part] if part else orphans).append((name, p))
    if orphans:
        raise ValueError(f"{type(model).__name__} ({family.name} family): parameters in no part: "
                         f"{[n for n, _ in orphans[:5]]} (prefixes: {family.parts})")
    missing = [p for p, ps in found.items() if not ps]
    if missing:
        raise ValueError(f"cannot find the {missing} part(s) in {type(model).__name__} ({family.name} family, "
                         f"prefixes: {family.parts})")
    return found


def set_trainable(model: nn.Module, trainable: list[str] | tuple[str, ...], allow_none: bool = False) -> dict[str, int]:
    """Freeze every parameter outside the ``trainable`` parts; return parameter counts.

    ``trainable`` is a subset of ``("vision", "connector", "llm")`` (R1V2 Table 4: connector only
    gave the released model; R1V3 ends with a connector-only stage). Tied embeddings follow the LLM.
    LoRA adapter parameters always train; with ``allow_none`` (LoRA) ``trainable`` may be empty.
    """
    bad = [p for p in trainable if p not in PARTS]
    if bad or (not trainable and not allow_none):
        raise ValueError(f"trainable must be a non-empty subset of {list(PARTS)}, got {list(trainable)}")
    parts = part_params(model)
    for part, named in parts.items():
        for name, p in named:  # LoRA adapters (models/lora.py) always train
            p.requires_grad_(part in trainable or ".lora_A." in name or ".lora_B." in name)
    counts = {"trainable": 0, "frozen": 0}
    for p in model.parameters():
        counts["trainable" if p.requires_grad else "frozen"] += param_numel(p)  # full counts under ZeRO-3 too
    for part, named in parts.items():
        counts[f"params/{part}"] = sum(param_numel(p) for _, p in named)
    log.info(
        "trainable parts %s: %s trainable, %s frozen parameters",
        list(trainable), f"{counts['trainable']:,}", f"{counts['frozen']:,}",
    )
    return counts
