"""Hallucination monitoring: per-step rates of hallucination signals in the rollouts.

Skywork R1V2 (arXiv 2504.16656) reports that too much reinforcement signal raises visual
hallucination, without publishing how it measured it; R1V3 (arXiv 2507.06167) counts chains of
thought that claim not to see the image (47 of 900 on MMMU, far less accurate). This module
measures three signals that need no judge model:

- ``contradiction``: the reasoning makes claims about the image ("red 2 green 0", the grammar of
  the synthetic task's reference responses) that the record's ``annotations["counts"]`` contradict.
  ``contradiction_rate`` = rows with at least one false claim / rows that make claims;
  ``claim_error_rate`` = false claims / all claims (both NaN when no row makes a claim).
- ``denial``: the completion says it cannot see the image (``denial_rate`` over all rows).
- ``empty_reasoning``: a boxed answer with no reasoning block or an empty one, i.e. an answer
  that ignores the image (``empty_reasoning_rate`` over all rows).

``HallucinationMonitor`` computes them in ``on_rewards`` and, when a rate exceeds its threshold for
``patience`` consecutive steps, warns, lowers a reward callback's weight, or stops training.
In a distributed run the counts are summed over ranks first, so every rank sees the same rates
and takes the same decision (the weights stay equal across ranks; all ranks stop together).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch

from lightning_r1v2.callbacks.hooks import RolloutHooks

__all__ = [
    "COLOUR_WORDS",
    "DEFAULT_DENIAL_PHRASES",
    "DEFAULT_THRESHOLDS",
    "RATE_NAMES",
    "contradicted_claims",
    "denies_seeing",
    "empty_reasoning",
    "reasoning_text",
    "hallucination_counts",
    "rates",
    "HallucinationMonitor",
]

log = logging.getLogger(__name__)

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
ACTIONS = ("warn", "scale_reward", "stop")

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


class HallucinationMonitor(RolloutHooks):
    """Log hallucination rates of each step's rollouts and act when one stays above its threshold.

    After ``on_rewards``, ``self.last_stats`` holds ``hallucination/contradiction_rate``,
    ``hallucination/claim_error_rate``, ``hallucination/denial_rate``,
    ``hallucination/empty_reasoning_rate`` (the module logs them) and, with
    ``action="scale_reward"``, ``hallucination/reward_weight``.

    A rate "exceeds" its threshold when strictly above it (a NaN rate never does and resets the
    streak). After ``patience`` consecutive steps over, the monitor acts once for that step (one
    message naming every offending rate) and restarts that rate's count, so a rate that stays high
    triggers again every ``patience`` steps (with ``scale_reward``: weight * scale each time).
    """

    def __init__(
        self,
        phrases: list[str] | None = None,
        thresholds: dict[str, float] | None = None,
        action: str = "warn",
        reward_name: str | None = None,
        scale: float = 0.5,
        min_weight: float = 0.0,
        patience: int = 1,
    ):
        """
        Args:
            phrases: Phrases that deny seeing the image (None: ``DEFAULT_DENIAL_PHRASES``).
            thresholds: Rate name (``contradiction``, ``claim_error``, ``denial``,
                ``empty_reasoning``) -> threshold in [0, 1]; None: ``DEFAULT_THRESHOLDS``
                (contradiction 0.5, denial 0.1, empty_reasoning 0.5); ``{}``: log only.
            action: What to do when a rate stays over its threshold: ``warn`` (log a warning),
                ``scale_reward`` (multiply the weight of reward ``reward_name`` by ``scale``) or
                ``stop`` (set ``trainer.should_stop``; the reason goes to ``self.stopped_reason``).
            reward_name: ``name`` of the reward callback whose weight ``scale_reward`` lowers.
            scale: Factor applied to that weight at each action, in [0, 1].
            min_weight: The weight is never scaled below this.
            patience: Consecutive steps over the threshold before acting.
        """
        super().__init__()
        thresholds = dict(DEFAULT_THRESHOLDS if thresholds is None else thresholds)
        unknown = sorted(set(thresholds) - set(RATE_NAMES))
        if unknown:
            raise ValueError(f"unknown threshold names {unknown}; choose from {list(RATE_NAMES)}")
        for k, v in thresholds.items():
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"threshold {k!r} must be a rate in [0, 1], got {v!r}")
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {list(ACTIONS)}, got {action!r}")
        if action == "scale_reward" and not reward_name:
            raise ValueError("action='scale_reward' needs reward_name (the reward callback's name)")
        if not 0.0 <= scale <= 1.0:
            raise ValueError(f"scale must be in [0, 1], got {scale}")
        if min_weight < 0:
            raise ValueError(f"min_weight must be >= 0, got {min_weight}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.phrases = tuple(DEFAULT_DENIAL_PHRASES if phrases is None else phrases)
        self.thresholds = {k: float(v) for k, v in thresholds.items()}
        self.action, self.reward_name = action, reward_name
        self.scale, self.min_weight, self.patience = float(scale), float(min_weight), int(patience)
        self.streaks = {k: 0 for k in self.thresholds}
        self.n_acted = 0
        self.stopped_reason: str | None = None
        self.last_stats: dict[str, float] = {}
        self._calls = 0
        self._weight: float | None = None  # weight set by scale_reward (checkpointed)
        self._restore_weight = False

    # -- Lightning hooks ----------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:  # noqa: D102
        if self.action == "scale_reward" and stage == "fit":
            self._reward_callback(trainer)  # fail early on a wrong name

    def on_rewards(self, trainer, pl_module, rollouts) -> None:
        """Compute the step's rates into ``last_stats``; act on those over threshold."""
        step = int(trainer.global_step) if hasattr(trainer, "global_step") else self._calls
        self._calls += 1
        if self.action == "scale_reward" and self._restore_weight:
            self._reward_callback(trainer).weight = self._weight
            self._restore_weight = False
        counts = self._reduce(trainer, hallucination_counts(rollouts.completions, rollouts.records, self.phrases))
        values = _rates_from_counts(counts)
        stats = {f"hallucination/{k}": v for k, v in values.items()}
        over = []
        for name, thr in self.thresholds.items():
            value = values[f"{name}_rate"]
            self.streaks[name] = self.streaks[name] + 1 if value > thr else 0  # NaN > thr is False
            if self.streaks[name] >= self.patience:
                over.append((name, value, thr))
                self.streaks[name] = 0
        if over:
            self._act(trainer, over, step)
        if self.action == "scale_reward":
            stats["hallucination/reward_weight"] = float(self._reward_callback(trainer).weight)
        self.last_stats = stats

    # -- checkpointing --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Streak per rate, number of actions, the stop reason and the scaled weight."""
        return {
            "streaks": dict(self.streaks),
            "n_acted": self.n_acted,
            "stopped_reason": self.stopped_reason,
            "calls": self._calls,
            "weight": self._weight,
        }

    def load_state_dict(self, state_dict: dict) -> None:  # noqa: D102
        self.streaks.update({k: int(v) for k, v in state_dict["streaks"].items() if k in self.streaks})
        self.n_acted = int(state_dict["n_acted"])
        self.stopped_reason = state_dict["stopped_reason"]
        self._calls = int(state_dict["calls"])
        self._weight = state_dict["weight"]
        self._restore_weight = self._weight is not None

    # -- internals ------------------------------------------------------------------------------------

    def _act(self, trainer, over: list[tuple[str, float, float]], step: int) -> None:
        what = "; ".join(f"{n}_rate {v:.4g} > threshold {t:.4g}" for n, v, t in over)
        msg = f"HallucinationMonitor at step {step}: {what} ({self.patience} consecutive step(s))"
        self.n_acted += 1
        if self.action == "warn":
            log.warning(msg)
        elif self.action == "scale_reward":
            cb = self._reward_callback(trainer)
            old = float(cb.weight)
            cb.weight = max(old * self.scale, self.min_weight)
            self._weight = float(cb.weight)
            log.warning(f"{msg}; reward {self.reward_name!r} weight {old:g} -> {cb.weight:g}")
        else:
            self.stopped_reason = msg
            log.error(f"{msg}; stopping training")
            trainer.should_stop = True

    def _reward_callback(self, trainer):
        callbacks = getattr(trainer, "callbacks", None) or []
        rewards = [cb for cb in callbacks if hasattr(cb, "score") and hasattr(cb, "weight")]
        for cb in rewards:
            if getattr(cb, "name", None) == self.reward_name:
                return cb
        names = [getattr(cb, "name", None) for cb in rewards]
        raise ValueError(
            f"HallucinationMonitor(action='scale_reward') found no reward callback named "
            f"{self.reward_name!r}; reward callbacks of the trainer: {names}"
        )

    @staticmethod
    def _reduce(trainer, counts: dict[str, int]) -> dict[str, float]:
        """Sum the counts over ranks (no-op in a single process)."""
        strategy = getattr(trainer, "strategy", None)
        if strategy is None or int(getattr(trainer, "world_size", 1) or 1) <= 1:
            return counts
        keys = list(counts)
        t = torch.tensor([counts[k] for k in keys], dtype=torch.float64, device=strategy.root_device)
        t = strategy.reduce(t, reduce_op="sum")
        return {k: float(v) for k, v in zip(keys, t.tolist())}

