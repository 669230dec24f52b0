"""Supervised fine-tuning loss: next-token cross-entropy on response tokens only.

Used by the optional cold-start SFT stage (R1V, arXiv 2504.05599; R1V3, arXiv 2507.06167) and
as the L_gen term of MPO (arXiv 2411.10442).

Departures from the papers, and why:
- The loss is the mean over all non-ignored tokens of the batch (token-level mean, as in
  ``F.cross_entropy(ignore_index=...)``), not a per-sequence mean: the reports do not say,
  and this is what HF/torchtune do. A batch with no target tokens gives 0, not NaN.
- ``sft_loss`` does NOT shift: ``logits[:, t]`` is scored against ``labels[:, t]``. Call
  ``shift_for_causal_lm`` first when labels are the input ids (the usual causal-LM layout).
"""

from __future__ import annotations

from torch import Tensor

from lightning_r1v2.losses.common import masked_mean, token_logprobs


def shift_for_causal_lm(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Align a causal LM's outputs with its targets: position t predicts token t + 1.

    Args:
        logits: ``[B, T, V]`` model outputs for input ids ``[B, T]``.
        labels: ``[B, T]`` the input ids with prompt/image/pad positions set to -100.

    Returns:
        ``(logits[:, :-1], labels[:, 1:])``, shapes ``[B, T-1, V]`` and ``[B, T-1]`` (views).
    """
    return logits[:, :-1], labels[:, 1:]


def sft_loss(
    logits: Tensor, labels: Tensor, ignore_index: int = -100
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean next-token negative log-likelihood over target tokens.

    L = -(1 / |M|) sum_{(b, t) in M} log softmax(logits[b, t])[labels[b, t]],
    M = {(b, t) : labels[b, t] != ignore_index}.

    The caller has already shifted: ``logits[:, t]`` predicts ``labels[:, t]``
    (see ``shift_for_causal_lm``).

    Args:
        logits: ``[B, T, V]`` any float dtype; the maths runs in float32.
        labels: ``[B, T]`` int target ids, ``ignore_index`` where no loss applies.
        ignore_index: label value that is skipped.

    Returns:
        ``(loss, stats)``: 0-dim float32 loss; stats ``loss`` and ``tokens`` (count of target
        tokens), both detached 0-dim tensors.
    """
    mask = labels != ignore_index  # [B, T]
    safe_labels = labels.masked_fill(~mask, 0)  # [B, T]
    nll = -token_logprobs(logits, safe_labels)  # [B, T]
    loss = masked_mean(nll, mask)
    stats = {"loss": loss.detach(), "tokens": mask.sum().detach()}
    return loss, stats
