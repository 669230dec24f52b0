"""Scoring completions under a policy: the forward pass shared by GRPO's loss and the entropy signal."""
from __future__ import annotations

import torch

from .types import Rollouts


def completion_logits(model, rows: Rollouts, temperature: float, blocked: list[int]) -> torch.Tensor:
    """``[n, C, V]`` logits of the distribution that chose each completion token.

    Prompt and completion are scored in one forward pass with position ids numbered as
    ``generate`` numbers them (left padding skipped), divided by the sampling temperature, with
    the tokens the engine never samples (``blocked``) at ``-inf``: exactly the distribution the
    rollout engine sampled from.
    """
    input_ids = torch.cat([rows.prompt_ids, rows.completion_ids], dim=1)  # [n, P+C]
    attention_mask = torch.cat([rows.prompt_mask, rows.completion_mask], dim=1)  # [n, P+C]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [n, P+C]
    C = rows.completion_ids.shape[1]
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        pixel_values=rows.pixel_values.to(model.dtype),
        logits_to_keep=C + 1,
    )
    logits = out.logits[:, :-1] / temperature  # [n, C, V] position t chooses completion token t
    block = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    block[blocked] = True
    return logits.masked_fill(block, float("-inf"))
