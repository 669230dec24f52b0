"""LoRA adapters through ``peft``, injected in place (``peft.inject_adapter_in_model``).

Adapters keep the model's own class and parameter names (``...q_proj.lora_A.default.weight`` beside
``...q_proj.base_layer.weight``), so the family's part prefixes, checkpoints and the rest of the
code see the same model. Only the adapters (and any part listed in ``trainable``) train; the
reference policy is the same model with its adapters switched off (``AdaptersOff``), so no second
copy is held, and the optimizer state covers the adapters only.

LoRA: W x + (alpha / r) B A x, A ``[r, in]`` (random), B ``[out, r]`` (zeros: the initial
policy equals the base) (Hu et al., arXiv 2106.09685).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .families import family_of_model_type, part_of


@dataclass
class LoraSettings:
    """A ``lora:`` block in YAML.

    Attributes:
        r: Rank of the adapters.
        alpha: Scale numerator (the update is ``alpha / r * B A``).
        dropout: Dropout on the adapters' input.
        parts: Parts whose linear layers get adapters (any of ``vision``, ``connector``, ``llm``).
        target_modules: Only linear layers whose name ends with one of these (e.g. ``[q_proj,
            v_proj]``); empty: every linear layer of ``parts`` except the output head.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    parts: list[str] = field(default_factory=lambda: ["llm"])
    target_modules: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"lora needs r >= 1, alpha > 0, 0 <= dropout < 1; got r={self.r}, alpha={self.alpha}, "
                             f"dropout={self.dropout}")
        bad = [p for p in self.parts if p not in ("vision", "connector", "llm")]
        if bad or not self.parts:
            raise ValueError(f"lora.parts must be a non-empty subset of [vision, connector, llm], got {self.parts}")


def lora_targets(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Names of the linear layers that get adapters."""
    family = family_of_model_type(model.config.model_type)
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or name.endswith("lm_head"):
            continue
        if part_of(name + ".", family) not in settings.parts:
            continue
        if settings.target_modules and not any(name.endswith(t) for t in settings.target_modules):
            continue
        out.append(name)
    if not out:
        raise ValueError(f"lora: no linear layer in parts {settings.parts} matches target_modules "
                         f"{settings.target_modules or '(any)'}")
    return out


def add_lora(model: nn.Module, settings: LoraSettings | dict, seed: int = 0) -> list[str]:
    """Inject LoRA adapters into ``model`` in place; returns the adapted layers' names.

    The adapters' random init (A) comes from ``seed`` alone, never from the run's RNG stream, so
    a module built twice gets the same adapters. Freezing is left to ``set_trainable``.
    """
    from peft import inject_adapter_in_model

    settings = settings if isinstance(settings, LoraSettings) else LoraSettings(**settings)
    targets = lora_targets(model, settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(lora_config(model, settings), model)
    return targets


def lora_config(model: nn.Module, settings: LoraSettings):
    """The ``peft.LoraConfig`` of ``settings`` on ``model`` (its targets named in full)."""
    from peft import LoraConfig

    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=lora_targets(model, settings), bias="none")


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every LoRA layer of ``model`` on or off (off: the layer computes its base only)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for mod in model.modules():
        if isinstance(mod, BaseTunerLayer):
            mod.enable_adapters(enabled)


def is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or ".lora_embedding_" in name


def has_lora(model: nn.Module) -> bool:
    return any(is_lora_param(n) for n, _ in model.named_parameters())


class AdaptersOff:
    """The base policy of a LoRA model: calls run with the adapters switched off, in eval mode.

    Stands in for a reference model (``GRPOModule`` with ``kl_coef > 0``, ``MPOModule``) without a
    second copy of the weights. Attribute reads go to the model (``dtype``, ``config``, ...).
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    @property
    def training(self) -> bool:
        return False

    def __call__(self, *args, **kwargs):
        was = self.model.training
        self.model.eval()
        set_adapters_enabled(self.model, False)
        try:
            return self.model(*args, **kwargs)
        finally:
            set_adapters_enabled(self.model, True)
            self.model.train(was)

    def eval(self):
        return self

    def requires_grad_(self, flag: bool = True):
        return self


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights with every adapter merged into its base layer, under the base model's names.

    Merges a copy: ``model`` keeps its adapters unmerged.
    """
    import copy

    from peft.tuners.lora import LoraLayer

    clone = copy.deepcopy(model)
    for mod in clone.modules():
        if isinstance(mod, LoraLayer):
            mod.merge()
    out = {}
    for k, v in clone.state_dict().items():
        if is_lora_param(k):
            continue
        out[k.replace(".base_layer.", ".")] = v
    return out
