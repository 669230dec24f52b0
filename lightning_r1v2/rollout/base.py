"""What every rollout engine shares: the sampling settings and the ``generate`` contract.

``GRPOModule`` calls ``engine.generate(policy, batch, group_size) -> Rollouts`` once per step and
scores the completions at ``engine.temperature`` (the distribution the engine sampled from), so
any engine with these two is usable from YAML by ``class_path``. An engine gets a ``Policy`` (the
model, its processor, its device, the trainer for the strategy), not the LightningModule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .types import Rollouts


@dataclass
class Policy:
    """What a rollout engine needs of the policy.

    Attributes:
        model: The policy (a transformers model).
        processor: Its processor (``models.inputs.policy_io`` reads the family's facts from it).
        device: Where the step's tensors live.
        step: Optimizer steps taken so far (when to push weights to an external engine).
        source: The checkpoint folder the policy was loaded from (None for the tiny default).
        trainer: The Lightning trainer, for the strategy (ZeRO-3's engine), world size and rank;
            None outside ``fit``.
    """

    model: Any
    processor: Any
    device: torch.device
    step: int = 0
    source: str | None = None
    trainer: Any = None


def as_policy(obj) -> Policy:
    """``obj`` as a ``Policy``: itself, or a ``PolicyModule``'s view (``module.policy()``)."""
    if isinstance(obj, Policy):
        return obj
    name = getattr(obj, "model_name", None)
    return Policy(model=obj.model, processor=obj.processor, device=obj.device,
                  step=int(getattr(obj, "global_step", 0) or 0), source=None if name == "tiny" else name,
                  trainer=getattr(obj, "_trainer", None))


class RolloutEngine:
    """Base class of the rollout engines (``HFGenerateEngine``, ``VLLMEngine``).

    Args:
        max_new_tokens: Longest completion (R1V1: 8K; R1V3: 4K -> 8K).
        temperature: Sampling temperature (R1V1: 1.0); the loss scores completions at it.
        top_p: Nucleus sampling mass (1.0: off).
        top_k: Top-k sampling (0: off).
    """

    def __init__(self, max_new_tokens: int = 32, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {top_k}")
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k

    def sampling_kwargs(self) -> dict:
        """The settings as Hugging Face ``generate`` keyword arguments."""
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}

    def generate(self, policy: Policy, batch: dict, group_size: int) -> Rollouts:
        """``group_size`` completions for each prompt of ``batch`` (a ``PromptCollator`` batch).

        Rows of one prompt are contiguous; ``old_logprobs`` holds the behaviour policy's
        per-token log-probs when the engine can record them (else None: the module computes them).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement generate(policy, batch, group_size)")


def rollouts_from_samples(batch: dict, group_size: int, prompt_ids, prompt_mask, completion_ids, completion_mask,
                          truncated, old_logprobs, io) -> Rollouts:
    """The ``Rollouts`` of ``group_size`` samples per prompt of ``batch``, from an engine's tensors.

    Every engine ends the same way: texts decoded (stop tokens and padding dropped, ``<think>``
    kept), records, media and per-token inputs repeated ``G`` times in row order (a group's rows
    share its media dict), group ids, and the behaviour log-probs zeroed outside the mask.
    """
    from .hf_engine import decode_completions

    G = group_size
    if old_logprobs is not None:
        old_logprobs = old_logprobs.masked_fill(completion_mask == 0, 0.0)  # [N, C]
    token_inputs = {k: v.to(prompt_ids.device).repeat_interleave(G, dim=0)
                    for k, v in batch.get("token_inputs", {}).items()}
    return Rollouts(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        media=[m for m in batch["media"] for _ in range(G)],
        completions=decode_completions(io.tokenizer, completion_ids, completion_mask, io),
        records=[r for r in batch["records"] for _ in range(G)],
        group_ids=torch.arange(len(batch["records"]), device=prompt_ids.device).repeat_interleave(G),  # [N]
        group_size=G,
        old_logprobs=old_logprobs,
        truncated=truncated,
        token_inputs=token_inputs,
    )
