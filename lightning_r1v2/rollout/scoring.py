"""Scoring completions under a policy: the forward pass shared by GRPO's loss and the entropy signal."""
from __future__ import annotations

import torch

from .types import Rollouts


def completion_logits(
    model, rows: Rollouts, temperature: float, blocked: list[int], share_prompt: bool = True
) -> torch.Tensor:
    """``[n, C, V]`` logits of the distribution that chose each completion token.

    Position ids are numbered as ``generate`` numbers them (left padding skipped), logits are
    divided by the sampling temperature, and the tokens the engine never samples (``blocked``)
    are at ``-inf``: exactly the distribution the rollout engine sampled from.

    With ``share_prompt`` the rows that repeat the previous row's prompt and image (the ``G``
    samples of a group are contiguous) reuse its prompt pass: each distinct prompt, vision
    tower included, runs once, and its KV cache - still in the autograd graph, so gradients
    reach the prompt and image weights from every sample - is indexed out to its rows. The
    completions then run on that cache. The result equals the one-pass forward up to float
    rounding (a test checks it); the saving is ``(G - 1) / G`` of the prompt and vision work.
    """
    C = rows.completion_ids.shape[1]
    runs = _prompt_runs(rows) if share_prompt and not _checkpointing(model) else None
    if runs is None:
        logits = _one_pass(model, rows, C)
    else:
        logits = _shared_prompt(model, rows, *runs)
    logits = logits / temperature  # [n, C, V] position t chooses completion token t
    block = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    block[blocked] = True
    return logits.masked_fill(block, float("-inf"))


def generation_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate`` numbers them: left padding skipped, the first real token at 0."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _one_pass(model, rows: Rollouts, C: int) -> torch.Tensor:
    input_ids = torch.cat([rows.prompt_ids, rows.completion_ids], dim=1)  # [n, P+C]
    attention_mask = torch.cat([rows.prompt_mask, rows.completion_mask], dim=1)  # [n, P+C]
    position_ids = generation_position_ids(attention_mask)  # [n, P+C]
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        pixel_values=None if rows.pixel_values is None else rows.pixel_values.to(model.dtype),
        logits_to_keep=C + 1,
    )
    return out.logits[:, :-1]  # [n, C, V]


def _shared_prompt(model, rows: Rollouts, first: torch.Tensor, run_of_row: torch.Tensor) -> torch.Tensor:
    pm = rows.prompt_mask[first]  # [u, P]
    out = model(
        input_ids=rows.prompt_ids[first],
        attention_mask=pm,
        position_ids=generation_position_ids(pm),
        pixel_values=None if rows.pixel_values is None else rows.pixel_values[first].to(model.dtype),
        use_cache=True,
        logits_to_keep=1,
    )
    cache = out.past_key_values
    cache.batch_select_indices(run_of_row)  # [u, ...] -> [n, ...]: each row gets its prompt's keys/values
    attention_mask = torch.cat([rows.prompt_mask, rows.completion_mask], dim=1)  # [n, P+C]
    P = rows.prompt_ids.shape[1]
    position_ids = generation_position_ids(attention_mask)[:, P:]  # [n, C]
    out2 = model(
        input_ids=rows.completion_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=False,
    )
    head = out.logits[run_of_row, -1:]  # [n, 1, V] the last prompt position chooses completion token 0
    return torch.cat([head, out2.logits[:, :-1]], dim=1)  # [n, C, V]


def _prompt_runs(rows: Rollouts) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Runs of consecutive rows with the same prompt, mask and image.

    Returns ``(first, run_of_row)``: the index of each run's first row ``[u]`` and each row's run
    ``[n]``; or None when no two neighbouring rows share a prompt (nothing to save).
    """
    n = len(rows)
    if n < 2:
        return None
    same = (rows.prompt_ids[1:] == rows.prompt_ids[:-1]).all(1) & (rows.prompt_mask[1:] == rows.prompt_mask[:-1]).all(1)
    if rows.pixel_values is not None:
        same &= (rows.pixel_values[1:] == rows.pixel_values[:-1]).flatten(1).all(1)  # same text, other image: no
    if not same.any():
        return None
    starts = torch.cat([torch.ones(1, dtype=torch.bool, device=same.device), ~same])  # [n]
    first = starts.nonzero().squeeze(1)  # [u]
    run_of_row = starts.long().cumsum(0) - 1  # [n]
    return first, run_of_row


def _checkpointing(model) -> bool:
    # HF turns the cache off while training with gradient checkpointing: score in one pass then
    on = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.x
    if on is None:
        on = getattr(model, "is_gradient_checkpointing", False)
    return bool(model.training and on)
