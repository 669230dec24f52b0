"""The claim grammar of the synthetic task, and the hallucination signals that need no judge.

Pure functions over completion texts and records, shared by the grounding reward, the
``HallucinationMonitor`` callback and the ``evaluate`` job (which import them from here).

- ``contradiction``: the reasoning makes claims about the image ("red 2 green 0", the grammar of
  the synthetic task's reference responses) that the record's ``annotations["counts"]`` contradict.
- ``denial``: the completion says it cannot see the image.
- ``empty_reasoning``: a boxed answer with no reasoning block or an empty one.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "COLOUR_WORDS",
    "DEFAULT_DENIAL_PHRASES",
    "DEFAULT_THRESHOLDS",
    "RATE_NAMES",
    "checked_claims",
    "contradicted_claims",
    "count_claims",
    "denies_seeing",
    "empty_reasoning",
    "reasoning_text",
    "hallucination_counts",
    "rates",
    "scene_counts",
]

COLOUR_WORDS = (
    "red", "green", "blue", "yellow", "purple", "orange", "pink", "brown",
    "black", "white", "grey", "gray", "cyan", "magenta",
)  # fmt: skip
NUMBER_WORDS = {
    w: i for i, w in enumerate("zero one two three four five six seven eight nine ten".split())
}
DEFAULT_DENIAL_PHRASES = (
    "can't see the image",
    "cannot see the image",
    "can not see the image",
    "unable to see the image",
    "not able to see the image",
    "unable to view",
    "i don't see an image",
    "i do not see an image",
    "don't see any image",
    "no image",
)
RATE_NAMES = ("contradiction", "claim_error", "denial", "empty_reasoning")
DEFAULT_THRESHOLDS = {"contradiction": 0.5, "denial": 0.1, "empty_reasoning": 0.5}

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


def reasoning_text(completion: str) -> str | None:
    """The reasoning block's content, or None when the completion has none.

    ``<think> X </think>`` gives X; a lone ``</think>`` (the chat template opened the block) gives
    the text before it; a lone ``<think>`` gives the text after it up to the first ``\\boxed``.

    Example:
        >>> reasoning_text("<think> red 2 </think> \\\\boxed{2}"), reasoning_text("\\\\boxed{2}")
        (' red 2 ', None)
    """
    if not isinstance(completion, str):
        return None
    start = completion.find(_THINK_OPEN)
    end = completion.find(_THINK_CLOSE, start + len(_THINK_OPEN) if start >= 0 else 0)
    if start >= 0 and end >= 0:
        return completion[start + len(_THINK_OPEN) : end]
    if end >= 0:
        return completion[:end]
    if start >= 0:
        rest = completion[start + len(_THINK_OPEN) :]
        box = _BOXED.search(rest)
        return rest[: box.start()] if box else rest
    return None


def count_claims(
    completion: str, palette: Iterable[str] = (), colour_words: Iterable[str] = COLOUR_WORDS
) -> list[tuple[str, int]]:
    """The reasoning's "<colour> <number>" claims, in order, as (colour lower-cased, count).

    A claim is "<colour> <number>" (optionally "<colour>: <number>"), the number in digits or a
    word zero..ten, colours (``palette`` and ``colour_words``) case-insensitive. Only the
    reasoning block is read (``reasoning_text``); [] without one.

    >>> count_claims("<think> Red 2 green: one </think> \\boxed{2}")
    [('red', 2), ('green', 1)]
    """
    text = reasoning_text(completion)
    if not text:
        return []
    colours = sorted({str(c).lower() for c in palette} | {c.lower() for c in colour_words}, key=len, reverse=True)
    numbers = "|".join(NUMBER_WORDS)
    pattern = re.compile(
        rf"(?<![\w-])({'|'.join(map(re.escape, colours))})\s*[:=]?\s*(\d+|{numbers})\b", re.IGNORECASE
    )
    out = []
    for m in pattern.finditer(text):
        num = m.group(2).lower()
        out.append((m.group(1).lower(), NUMBER_WORDS[num] if num in NUMBER_WORDS else int(num)))
    return out


def scene_counts(annotations: dict | None) -> dict[str, int] | None:
    """``annotations["counts"]`` with lower-cased colours; None without annotations or counts."""
    counts = annotations.get("counts") if isinstance(annotations, dict) else None
    return {str(k).lower(): int(v) for k, v in counts.items()} if counts else None


def checked_claims(
    completion: str, truth: dict[str, int], colour_words: Iterable[str] = COLOUR_WORDS
) -> list[tuple[str, int, bool]]:
    """The reasoning's claims as (colour, count, is_false) against the scene's counts ``truth``.

    False when the colour is in the palette (the keys of ``truth``) with another count, or when
    it is not (any of ``colour_words``) and the stated count is above 0.

    >>> checked_claims("<think> red 2 green one purple 0 </think>", {"red": 2, "green": 0})
    [('red', 2, False), ('green', 1, True), ('purple', 0, False)]
    """
    return [(colour, value, value != truth[colour] if colour in truth else value > 0)
            for colour, value in count_claims(completion, truth, colour_words)]


def contradicted_claims(
    completion: str, annotations: dict | None, colour_words: Iterable[str] = COLOUR_WORDS
) -> tuple[int, int]:
    """(false_claims, total_claims) in the reasoning, checked against ``annotations["counts"]``.

    Claims as ``checked_claims`` reads and judges them. (0, 0) without annotations, counts or
    reasoning.

    Example:
        counts {"red": 2, "green": 0, "blue": 3}, reasoning "red 2 green one blue 3 purple 2":
        red 2 true, green 1 false (0), blue 3 true, purple 2 false (no purple) -> (2, 4).

        >>> contradicted_claims("<think> red 2 green one purple 0 </think>", {"counts": {"red": 2, "green": 0}})
        (1, 3)
    """
    truth = scene_counts(annotations)
    if truth is None:
        return 0, 0
    claims = checked_claims(completion, truth, colour_words)
    return sum(false for _, _, false in claims), len(claims)


def denies_seeing(completion: str, phrases: Iterable[str] = DEFAULT_DENIAL_PHRASES) -> bool:
    """True when the completion says it cannot see the image (any phrase, case-insensitive).

    A phrase matches at a word start (so "no image" does not fire on "piano image"); curly
    apostrophes count as straight ones and runs of whitespace as one space.

    Example:
        >>> denies_seeing("<think> I can’t see the image, so I guess. </think> \\\\boxed{2}")
        True
        >>> denies_seeing("<think> red 2 </think> \\\\boxed{2}")
        False
    """
    if not isinstance(completion, str):
        return False
    text = re.sub(r"\s+", " ", completion.replace("\u2019", "'").lower())
    for p in phrases:
        p = re.sub(r"\s+", " ", p.replace("\u2019", "'").lower().strip())
        if p and re.search(rf"(?<!\w){re.escape(p)}", text):
            return True
    return False


def empty_reasoning(completion: str) -> bool:
    """True when a ``\\boxed{}`` answer comes with no reasoning block or an empty one.

    Example:
        >>> [empty_reasoning(c) for c in ["\\\\boxed{2}", "<think>  </think> \\\\boxed{2}",
        ...                               "<think> red 2 </think> \\\\boxed{2}", "<think></think>"]]
        [True, True, False, False]
    """
    if not isinstance(completion, str) or not _BOXED.search(completion):
        return False
    text = reasoning_text(completion)
    return text is None or not text.strip()


def hallucination_counts(
    completions: list[str], records: list[dict] | None, phrases: Iterable[str] | None = None
) -> dict[str, int]:
    """Raw counts behind ``rates``: rows, claim rows, contradicted rows, false/total claims, ..."""
    phrases = DEFAULT_DENIAL_PHRASES if phrases is None else tuple(phrases)
    records = records if records is not None else [None] * len(completions)
    c = dict(rows=0, claim_rows=0, contradicted_rows=0, false_claims=0, claims=0, denials=0, empty=0)
    for text, rec in zip(completions, records):
        ann = rec.get("annotations") if isinstance(rec, dict) else None
        false, total = contradicted_claims(text, ann)
        c["rows"] += 1
        c["claim_rows"] += total > 0
        c["contradicted_rows"] += false > 0
        c["false_claims"] += false
        c["claims"] += total
        c["denials"] += denies_seeing(text, phrases)
        c["empty"] += empty_reasoning(text)
    return {k: int(v) for k, v in c.items()}


def _rates_from_counts(c: dict[str, float]) -> dict[str, float]:
    def ratio(a, b):
        return a / b if b else float("nan")

    return {
        "contradiction_rate": ratio(c["contradicted_rows"], c["claim_rows"]),
        "claim_error_rate": ratio(c["false_claims"], c["claims"]),
        "denial_rate": ratio(c["denials"], c["rows"]),
        "empty_reasoning_rate": ratio(c["empty"], c["rows"]),
    }


def rates(
    completions: list[str], records: list[dict] | None, phrases: Iterable[str] | None = None
) -> dict[str, float]:
    """Hallucination rates of a set of completions (records carry ``annotations``).

    Returns ``contradiction_rate`` (rows with a false claim / rows with claims), ``claim_error_rate``
    (false claims / claims), ``denial_rate`` and ``empty_reasoning_rate`` (over all rows); NaN where
    the denominator is 0.

    Example:
        >>> recs = [{"annotations": {"counts": {"red": 2}}}] * 2
        >>> rates(["<think> red 3 </think> \\\\boxed{3}", "\\\\boxed{2}"], recs)["empty_reasoning_rate"]
        0.5
    """
    return _rates_from_counts(hallucination_counts(completions, records, phrases))
