"""``cli.py export``: a Lightning checkpoint to a Hugging Face folder (model + processor).
``cli.py consolidate``: a DeepSpeed checkpoint folder to one ``.ckpt`` file.

Under ``DeepSpeedStrategy`` a checkpoint is a folder named like a file (``last.ckpt/``: ``latest``,
``checkpoint/zero_pp_rank_<r>_mp_rank_00_{model,optim}_states.pt``, one shard per rank).
``export``, ``evaluate`` and ``build-pairs`` take such a folder directly (they consolidate it into a
temporary file first); ``init_ckpt`` takes a file, which ``consolidate`` writes once.

The exported folder names stock transformers classes only: where the policy's processor is our
image-only stand-in (``TinyVLProcessor``, used when torchvision is missing) the folder declares the
stock class it stands in for (``InternVLProcessor``), and the video processor config of the source
folder is kept, so ``AutoProcessor`` loads the folder as it loaded the source.
"""
from __future__ import annotations

import importlib
import inspect
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("lightning_r1v2.export")


def is_deepspeed_checkpoint(path) -> bool:
    """True for a checkpoint folder written by Lightning's ``DeepSpeedStrategy``."""
    p = Path(path)
    return p.is_dir() and ((p / "latest").is_file() or any(p.glob("*/*_model_states.pt")))


def consolidate(ckpt_path: str, out: str) -> str:
    """Write a DeepSpeed checkpoint folder as one Lightning ``.ckpt`` (fp32 weights, Lightning's state).

    The ZeRO shards of every rank are merged on the CPU of this one process (DeepSpeed's
    ``zero_to_fp32`` through Lightning's ``convert_zero_checkpoint_to_fp32_state_dict``): it needs
    memory for the whole model in fp32 (about 4 bytes per parameter, 150 GB at 38B). The result
    loads with ``torch.load``, serves as the next stage's ``init_ckpt`` and as ``export``'s input;
    it holds no optimizer state, so resume a run from the folder itself (``--ckpt_path``).

    Args:
        ckpt_path: The folder (e.g. ``runs/grpo-zero3/checkpoints/last.ckpt``).
        out: The file to write. Not a ``last*.ckpt`` beside the folder: ``--ckpt_path last``
            picks the newest ``last*`` of that directory and would resume from it.
    """
    src, dst = Path(ckpt_path), Path(out)
    if not src.exists():
        raise FileNotFoundError(f"{ckpt_path}: no such checkpoint")
    if not is_deepspeed_checkpoint(src):
        raise ValueError(f"{ckpt_path}: not a DeepSpeed checkpoint folder (no 'latest' file or "
                         "*/*_model_states.pt); a .ckpt file needs no consolidation")
    if dst.resolve().parent == src.resolve().parent and dst.name.startswith("last"):
        raise ValueError(f"{out}: a last*.ckpt beside {src.name} would be what '--ckpt_path last' resumes from; "
                         "write the consolidated file elsewhere or under another name")
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    dst.parent.mkdir(parents=True, exist_ok=True)
    state = convert_zero_checkpoint_to_fp32_state_dict(str(src), str(dst))
    print(f"consolidate: wrote {len(state['state_dict'])} tensors of {ckpt_path} (step {state.get('global_step')}) "
          f"to {out}")
    return out


def load_module(ckpt_path: str, map_location: str = "cpu"):
    """The LightningModule saved in ``ckpt_path`` (its class is recorded in the checkpoint).

    ``ckpt_path`` is a ``.ckpt`` file or a DeepSpeed checkpoint folder (consolidated on the fly).
    """
    path = Path(ckpt_path)
    if not path.exists():
        raise FileNotFoundError(f"{ckpt_path}: no such checkpoint")
    if is_deepspeed_checkpoint(path):
        with tempfile.TemporaryDirectory() as tmp:
            log.info("%s is a DeepSpeed checkpoint folder: consolidating it first", ckpt_path)
            return load_module(consolidate(str(path), str(Path(tmp) / "consolidated.ckpt")), map_location)
    if path.is_dir():
        raise ValueError(f"{ckpt_path}: a folder, but not a DeepSpeed checkpoint (a Hugging Face folder is "
                         "a model, not a checkpoint: nothing to export)")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    target = ckpt.get("r1v2_module_class")
    if not target:
        raise ValueError(f"{ckpt_path}: not a lightning-r1v2 checkpoint (no 'r1v2_module_class' entry)")
    module_name, _, cls_name = target.rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls.load_from_checkpoint(str(path), map_location=map_location)


def export(ckpt_path: str, out: str, dtype: str | None = None, merge: bool = True) -> str:
    """Write the policy of a checkpoint as a Hugging Face folder that loads with ``from_pretrained``.

    Args:
        ckpt_path: A ``.ckpt`` written by ``cli.py fit``, or a DeepSpeed checkpoint folder.
        out: Output folder (created).
        dtype: Cast the weights before saving (e.g. ``bfloat16``); None keeps them.
        merge: For a LoRA policy: merge the adapters into the weights (one ordinary folder), or
            write ``out/base`` (the base model, as loaded with ``init_ckpt``) and ``out/adapter``
            (a PEFT folder: ``PeftModel.from_pretrained(AutoModelForImageTextToText
            .from_pretrained(out/base), out/adapter)``).
    """
    module = load_module(ckpt_path)
    model = module.model
    name = getattr(module, "model_name", "tiny")  # the policy's source folder (the module loaded from it)
    source = Path(name) if name != "tiny" else None
    if getattr(module, "lora", None) is not None:
        _export_lora(module, Path(out), dtype, merge, source)
        print(f"export: wrote the LoRA policy of {ckpt_path} to {out} ({'merged' if merge else 'base + adapter'})")
        return out
    if dtype:
        model = model.to(getattr(torch, dtype))
    Path(out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_processor(module.processor, out, source)
    print(f"export: wrote model and processor of {ckpt_path} to {out}")
    return out


def _export_lora(module, out: Path, dtype: str | None, merge: bool, source: Path | None) -> None:
    from ..models.lora import is_lora_param, lora_config, merged_state_dict

    model = module.model
    base = type(model)(model.config)  # the architecture without adapters
    if merge:
        base.load_state_dict(merged_state_dict(model))
        folder = out
    else:
        base.load_state_dict({k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()
                              if not is_lora_param(k)})
        folder = out / "base"
    base.generation_config = model.generation_config
    if dtype:
        base = base.to(getattr(torch, dtype))
    folder.mkdir(parents=True, exist_ok=True)
    base.save_pretrained(folder)
    save_processor(module.processor, folder, source)
    if not merge:  # a PEFT adapter folder, named as PeftModel names its parameters
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        cfg = lora_config(base, module.lora)  # the targets, found on the base architecture
        cfg.base_model_name_or_path = str(folder.resolve())
        adapter = out / "adapter"
        adapter.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(str(adapter))
        state = get_peft_model_state_dict(model)
        save_file({f"base_model.model.{k}": v.detach().contiguous().cpu() for k, v in state.items()},
                  str(adapter / "adapter_model.safetensors"))


# Sub-processor: (its key in processor_config.json, its legacy file of its own, its type key).
_SUB_PROCESSORS = {
    "image_processor": ("preprocessor_config.json", "image_processor_type"),
    "video_processor": ("video_preprocessor_config.json", "video_processor_type"),
}
# Loading arguments transformers writes back into tokenizer_config.json.
_LOAD_KWARGS = ("local_files_only", "is_local")
# Image processor settings a derived video processor config shares.
_SHARED_KEYS = ("size", "resample", "do_resize", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
                "image_std", "do_convert_rgb")


def stock_processor_class(processor) -> type:
    """The transformers processor class ``processor`` is (or stands in for: the first one in its MRO)."""
    for cls in type(processor).__mro__:
        if cls.__module__.startswith("transformers.") and cls.__name__ != "ProcessorMixin":
            return cls
    raise TypeError(f"{type(processor).__name__} derives from no transformers processor class")


def save_processor(processor, out, source: Path | None = None) -> None:
    """``processor.save_pretrained(out)``, declaring stock classes only.

    1. ``processor_class`` in ``processor_config.json`` / ``tokenizer_config.json`` is the stock
       class (``stock_processor_class``).
    2. A sub-processor the stock class takes but ``processor`` lacks (the video processor of our
       image-only stand-in) keeps its config from ``source``: its section of the source's
       ``processor_config.json`` or its legacy file (``video_preprocessor_config.json``). Without a
       source, a video processor config is derived from the image processor's (same size and
       normalisation; type named after the processor class, e.g. ``InternVLVideoProcessor``).
    """
    out = Path(out)
    processor.save_pretrained(out)
    stock = stock_processor_class(processor)
    cfg_file = out / "processor_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    takes = inspect.signature(stock.__init__).parameters
    src_cfg = {}
    if source is not None and (source / "processor_config.json").exists():
        src_cfg = json.loads((source / "processor_config.json").read_text())
    for key, (legacy, type_key) in _SUB_PROCESSORS.items():
        if key not in takes or key in cfg or (out / legacy).exists():
            continue
        if key in src_cfg:
            cfg[key] = src_cfg[key]
        elif source is not None and (source / legacy).exists():
            shutil.copyfile(source / legacy, out / legacy)
        elif key == "video_processor" and "image_processor" in cfg:
            shared = {k: v for k, v in cfg["image_processor"].items() if k in _SHARED_KEYS}
            cfg[key] = {type_key: stock.__name__.removesuffix("Processor") + "VideoProcessor", **shared}
        else:
            log.warning("%s: no %s config to write (the stock %s takes one)", out, key, stock.__name__)
    cfg["processor_class"] = stock.__name__
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for name in ("tokenizer_config.json", *(legacy for legacy, _ in _SUB_PROCESSORS.values())):
        path = out / name
        if path.exists():
            data = json.loads(path.read_text())
            # how this process loaded the tokenizer, not a setting of the folder
            stale = [k for k in _LOAD_KWARGS if k in data]
            if "processor_class" in data or stale:
                data = {k: v for k, v in data.items() if k not in _LOAD_KWARGS}
                data["processor_class"] = stock.__name__
                path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
