"""A visual-grounding rule reward: are the reasoning's claims about the image true?

R1V2's hybrid reward adds rule checks beyond the final answer ("step completeness"). On data
with ground-truth annotations the most useful such rule checks what the reasoning claims to see:

    r_ground = 1 - false_claims / claims        (None when the record has no annotations,
                                                  0.0 when the reasoning makes no claim)

Without it, GRPO on the answer alone also reinforces lucky guesses whose reasoning misreads the
image: on the tiny task the hallucination rate rose from 2% to 24% in 200 steps while held-out
accuracy fell (``configs/tiny/grpo.yaml`` comments).

Example:
    counts {"red": 2, "green": 0, "blue": 1}; "<think> red 2 green 1 blue 1 </think> \\boxed{2}"
    -> claims red 2 (true), green 1 (false), blue 1 (true) -> 1 - 1/3 = 0.667.
"""
from __future__ import annotations

from ..callbacks.hallucination import contradicted_claims


def grounding_reward(completions: list[str], annotations: list | None = None, **kwargs) -> list[float | None]:
    """Share of the reasoning's count claims that match the image's annotations.

    >>> grounding_reward(["<think> red 2 green 1 </think> \\\\boxed{2}"], annotations=[{"counts": {"red": 2, "green": 0}}])
    [0.5]
    """
    annotations = annotations or [None] * len(completions)
    out: list[float | None] = []
    for text, ann in zip(completions, annotations):
        if not isinstance(ann, dict) or not ann.get("counts"):
            out.append(None)
            continue
        false, total = contradicted_claims(text, ann)
        out.append(0.0 if total == 0 else 1.0 - false / total)
    return out
