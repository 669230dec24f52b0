"""A visual-grounding rule reward: are the reasoning's claims about the image true, and complete?

R1V2's hybrid reward adds rule checks beyond the final answer ("step completeness"). On data
with ground-truth annotations the most useful such rule checks what the reasoning claims to see:

    r_ground = 1 - (false + missing) / (claims + missing)

``claims`` are the reasoning's "<colour> <number>" statements, ``false`` those the annotations
contradict, ``missing`` the colours of the scene's palette (the keys of ``annotations["counts"]``)
the reasoning never states a count for. None when the record has no annotations; 0.0 when the
reasoning makes no claim. ``complete=False`` drops the ``missing`` term (a precision only).

Why both terms:
- Without the rule, GRPO on the answer alone also reinforces lucky guesses whose reasoning
  misreads the image: on the tiny task the hallucination rate rose from 2% to 24% in 200 steps
  while held-out accuracy fell.
- With the precision alone, the policy found the hack of stating less: at lr 1e-3 the tiny
  model's reasoning collapsed to ``<think> red 0 green</think>`` (one true claim, reward 1.0)
  and it answered without reading its counts; held-out accuracy fell from 0.67 to 0.60.

Example:
    counts {"red": 2, "green": 0, "blue": 1}; "<think> red 2 green 1 </think> \\boxed{2}"
    -> claims red 2 (true), green 1 (false); blue never stated -> 1 - (1 + 1) / (2 + 1) = 0.333.
"""
from __future__ import annotations

from .claims import checked_claims, scene_counts


def grounding_reward(
    completions: list[str], annotations: list | None = None, complete: bool = True, **kwargs
) -> list[float | None]:
    """1 - (false + missing) / (claims + missing) over the reasoning's count claims.

    >>> grounding_reward(["<think> red 2 green 1 </think> \\\\boxed{2}"], annotations=[{"counts": {"red": 2, "green": 0}}])
    [0.5]
    >>> grounding_reward(["<think> red 2 </think> \\\\boxed{2}"], annotations=[{"counts": {"red": 2, "green": 0}}])
    [0.5]
    >>> grounding_reward(["<think> red 2 </think> \\\\boxed{2}"], annotations=[{"counts": {"red": 2, "green": 0}}], complete=False)
    [1.0]
    """
    annotations = annotations or [None] * len(completions)
    out: list[float | None] = []
    for text, ann in zip(completions, annotations):
        truth = scene_counts(ann)
        if truth is None:
            out.append(None)
            continue
        claims = checked_claims(text, truth)
        if not claims:
            out.append(0.0)
            continue
        false = sum(is_false for _, _, is_false in claims)
        missing = len(set(truth) - {colour for colour, _, _ in claims}) if complete else 0
        out.append(1.0 - (false + missing) / (len(claims) + missing))
    return out
