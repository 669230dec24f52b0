"""Scoring completions under a policy: the forward pass shared by GRPO's loss and the entropy signal."""
from __future__ import annotations

import torch

from ..models.inputs import generation_position_ids, policy_io
from .types import Rollouts


def completion_logits(
    model, rows: Rollouts, temperature: float, processor, share_prompt: bool = True
) -> torch.Tensor:
    """``[n, C, V]`` logits of the distribution that chose each completion token.

    Each row carries exactly its own media and per-token inputs (``models/inputs.py``); position
    ids are numbered as ``generate`` numbers them (left padding skipped), or by the model itself
    for families with 3-D positions; logits are divided by the sampling temperature, and the
    tokens the engine never samples (``PolicyIO.blocked_ids``) are at ``-inf``: exactly the
    distribution the rollout engine sampled from.

    With ``share_prompt`` (families whose ``Family.share_prompt`` allows it) the rows that repeat
    the previous row's prompt and media (the ``G`` samples of a group are contiguous) reuse its
    prompt pass: each distinct prompt, vision tower included, runs once, and its KV cache - still
    in the autograd graph, so gradients reach the prompt and image weights from every sample - is
    indexed out to its rows. The result equals the one-pass forward up to float rounding (a test
    checks it); the saving is ``(G - 1) / G`` of the prompt and vision work.
    """
    io = policy_io(processor)
    C = rows.completion_ids.shape[1]
    ok = share_prompt and io.family.share_prompt and not _checkpointing(model)
    runs = _prompt_runs(rows) if ok else None
    if runs is None:
        logits = _one_pass(model, rows, C, io)
    else:
        logits = _shared_prompt(model, rows, io, *runs)
    logits = logits / temperature  # [n, C, V] position t chooses completion token t
    block = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    block[io.blocked_ids] = True
    return logits.masked_fill(block, float("-inf"))


def _one_pass(model, rows: Rollouts, C: int, io) -> torch.Tensor:
    input_ids = torch.cat([rows.prompt_ids, rows.completion_ids], dim=1)  # [n, P+C]
    attention_mask = torch.cat([rows.prompt_mask, rows.completion_mask], dim=1)  # [n, P+C]
    kw = io.model_inputs(input_ids, attention_mask, rows.media, rows.token_inputs, dtype=model.dtype)
    out = model(**kw, logits_to_keep=C + 1)
    return out.logits[:, :-1]  # [n, C, V]


def _shared_prompt(model, rows: Rollouts, io, first: torch.Tensor, run_of_row: torch.Tensor) -> torch.Tensor:
    pm = rows.prompt_mask[first]  # [u, P]
    kw = io.model_inputs(rows.prompt_ids[first], pm, [rows.media[i] for i in first.tolist()],
                         {k: v[first] for k, v in rows.token_inputs.items()}, dtype=model.dtype)
    out = model(**kw, use_cache=True, logits_to_keep=1)
    cache = out.cache
    cache.batch_select_indices(run_of_row)  # [u, ...] -> [n, ...]: each row gets its prompt's keys/values
    attention_mask = torch.cat([rows.prompt_mask, rows.completion_mask], dim=1)  # [n, P+C]
    P = rows.prompt_ids.shape[1]
    kw2 = io.model_inputs(rows.completion_ids, attention_mask[:, P:], dtype=model.dtype)
    kw2["attention_mask"] = attention_mask
    if "position_ids" in kw2:
        kw2["position_ids"] = generation_position_ids(attention_mask)[:, P:]  # [n, C]
    out2 = model(**kw2, cache=cache, use_cache=False)
    head = out.logits[run_of_row, -1:]  # [n, 1, V] the last prompt position chooses completion token 0
    return torch.cat([head, out2.logits[:, :-1]], dim=1)  # [n, C, V]


def _prompt_runs(rows: Rollouts) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Runs of consecutive rows with the same prompt, mask and media.

    Returns ``(first, run_of_row)``: the index of each run's first row ``[u]`` and each row's run
    ``[n]``; or None when no two neighbouring rows share a prompt (nothing to save).
    """
    n = len(rows)
    if n < 2:
        return None
    same = (rows.prompt_ids[1:] == rows.prompt_ids[:-1]).all(1) & (rows.prompt_mask[1:] == rows.prompt_mask[:-1]).all(1)
    same_media = torch.tensor([_same_media(rows.media[i], rows.media[i + 1]) for i in range(n - 1)],
                              device=same.device)  # same text, other image: no
    same &= same_media
    if not same.any():
        return None
    starts = torch.cat([torch.ones(1, dtype=torch.bool, device=same.device), ~same])  # [n]
    first = starts.nonzero().squeeze(1)  # [u]
    run_of_row = starts.long().cumsum(0) - 1  # [n]
    return first, run_of_row


def _same_media(a: dict, b: dict) -> bool:
    if a is b:
        return True
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def _checkpointing(model) -> bool:
    # HF turns the cache off while training with gradient checkpointing: score in one pass then
    on = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.x
    if on is None:
        on = getattr(model, "is_gradient_checkpointing", False)
    return bool(model.training and on)
