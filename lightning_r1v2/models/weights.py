"""Loading weights into a built policy: a Lightning checkpoint's ``model.*`` tensors (``init_ckpt``),
LoRA checkpoints merged, and ZeRO-3 partitioned models filled one module at a time.

Moved here from the modules (they are model plumbing, not training): ``PolicyModule`` calls
``load_policy_weights`` for ``init_ckpt`` and ``hf_deepspeed_config`` in ``configure_model``.
"""
from __future__ import annotations

import logging

import torch

from ..utils.distributed import world_and_rank
from .loading import is_zero3_partitioned

log = logging.getLogger("lightning_r1v2.models")


def load_policy_weights(model, ckpt_path: str) -> None:
    """Copy the ``model.*`` weights of a lightning-r1v2 checkpoint into ``model`` (strict).

    A ZeRO-3 partitioned ``model`` (``defer_init`` under ZeRO-3) is filled one module at a time
    (``load_into_zero3``); ``ckpt_path`` must then be a single file (consolidate a DeepSpeed
    checkpoint folder first, docs/scale.md "Resuming"). Every rank memory-maps it.
    """
    from pathlib import Path

    if not Path(ckpt_path).exists():
        raise FileNotFoundError(f"init_ckpt {ckpt_path!r} does not exist (run the previous stage first)")
    if Path(ckpt_path).is_dir():
        raise ValueError(f"init_ckpt {ckpt_path!r} is a folder (a DeepSpeed checkpoint?): consolidate it into one file "
                         f"once, `python cli.py consolidate --ckpt_path {ckpt_path} --out FILE.ckpt`, and pass that "
                         "file (docs/scale.md 'Resuming')")
    partitioned = is_zero3_partitioned(model)
    # mmap under ZeRO-3: every rank opens the file, only rank 0 reads the values it copies
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=partitioned)
    state = ckpt["state_dict"]
    weights = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    if "r1v2_lora" in ckpt:  # adapters (and fully trained parts) over a base: merge them into the weights
        weights = _merged_lora_weights(model, ckpt["r1v2_lora"], weights, ckpt_path)
    if partitioned:
        missing, unexpected = load_into_zero3(model, weights, ckpt_path)
    else:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k not in ("lm_head.weight",)]  # tied to the embeddings
    if missing or unexpected:
        raise ValueError(f"{ckpt_path}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    log.info("loaded policy weights from %s", ckpt_path)


def _merged_lora_weights(model, info: dict, trained: dict, source: str) -> dict:
    """The full weights of a LoRA checkpoint: its base (``init_ckpt`` or the model as built), its
    adapters and fully trained parts on top, every adapter merged into its layer."""
    import copy

    from .lora import add_lora, merged_state_dict

    if is_zero3_partitioned(model):
        raise ValueError(f"{source}: a LoRA checkpoint as init_ckpt under ZeRO-3 is not supported; export it merged "
                         "(`cli.py export --merge true`) and use that folder as `model`")
    base = copy.deepcopy(model)
    if info.get("init_ckpt"):
        load_policy_weights(base, info["init_ckpt"])
    add_lora(base, info["settings"])
    missing = sorted(set(trained) - set(dict(base.named_parameters())))
    if missing:
        raise ValueError(f"{source}: LoRA checkpoint tensors the rebuilt model lacks: {missing[:5]}")
    with torch.no_grad():
        params = dict(base.named_parameters())
        for k, v in trained.items():
            params[k].copy_(v)
    log.info("%s: LoRA adapters merged into the base weights", source)
    return merged_state_dict(base)


def load_into_zero3(model, weights: dict, source: str = "weights") -> tuple[list[str], list[str]]:
    """Copy ``weights`` (name -> tensor) into a ZeRO-3 partitioned ``model``; return ``(missing, unexpected)``.

    transformers' ``_load_state_dict_into_zero3_model`` done for a plain state dict: module by
    module, its own parameters are gathered (``deepspeed.zero.GatheredParameters(modifier_rank=0)``),
    rank 0 copies the values, and leaving the context broadcasts and re-partitions them; so at most
    one module's full parameters exist at a time. Buffers are not partitioned: every rank copies
    them. Missing keys are skipped (the caller decides), and shapes are checked on every rank
    before anything is copied, so all ranks raise together instead of leaving some in a collective.
    On parameters that are not partitioned the gather is a no-op and this is a plain copy.
    """
    import deepspeed
    from torch import nn

    rank = world_and_rank()[1]
    plan: list[tuple[list, list]] = []  # per module: [(param, tensor)], [(buffer, tensor)]
    seen: set[str] = set()
    missing: list[str] = []
    for prefix, module in model.named_modules():
        params, buffers = [], []
        named = list(module.named_parameters(recurse=False)) + [
            (n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set
        ]
        for name, t in named:
            key = f"{prefix}.{name}" if prefix else name
            seen.add(key)
            if key not in weights:
                missing.append(key)
                continue
            shape = tuple(getattr(t, "ds_shape", t.shape))
            if tuple(weights[key].shape) != shape:
                raise ValueError(f"{source}: {key} has shape {tuple(weights[key].shape)}, the model {shape}")
            (params if isinstance(t, nn.Parameter) else buffers).append((t, weights[key]))
        if params or buffers:
            plan.append((params, buffers))
    unexpected = sorted(set(weights) - seen)
    if unexpected:
        return missing, unexpected
    with torch.no_grad():
        for params, buffers in plan:
            if params:
                with deepspeed.zero.GatheredParameters([p for p, _ in params], modifier_rank=0):
                    if rank == 0:  # the modifier rank writes; the context broadcasts on exit
                        for p, value in params:
                            p.data.copy_(value)
            for b, value in buffers:
                b.copy_(value)
    return missing, unexpected


def hf_deepspeed_config(config: dict):
    """``transformers.integrations.HfDeepSpeedConfig(config)``: while it is referenced,
    ``is_deepspeed_zero3_enabled()`` is True and ``from_pretrained`` loads into partitioned parameters."""
    try:
        from transformers.integrations import HfDeepSpeedConfig

        return HfDeepSpeedConfig(config)
    except ImportError as e:  # transformers checks for accelerate and deepspeed here
        raise ImportError(
            f"loading the policy under DeepSpeed ZeRO-3 needs transformers' DeepSpeed integration, which needs the "
            f"`deepspeed` and `accelerate` packages (pip install -e '.[deepspeed]'): {e}"
        ) from e
