"""Rule-based rewards: the R1 format, and answer correctness from the last ``\\boxed{}``.

Both are plain picklable functions ``fn(completions, **columns) -> list[float | None]`` (TRL's
reward-function convention): one value per completion, ``None`` where the reward does not apply,
unknown keyword arguments (other dataset columns) ignored.

Answer checking follows the reports' rule ("the last ``\\boxed{...}`` after normalisation equals
the reference"), widened to mathematical equivalence with ``math_verify`` where the reference is
mathematical (``1/2`` = ``0.5`` = ``\\frac{1}{2}``; ``x=3`` = ``3``) and to option letters or
option texts for multiple-choice records.
"""
from __future__ import annotations

import functools
import re
import threading

__all__ = ["format_reward", "accuracy_reward", "extract_boxed", "normalize_answer", "is_correct"]

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces handled.

    Escaped braces (``\\{``, ``\\}``) do not count. An unbalanced last box gives None (the
    earlier boxes are not consulted: the last one is the answer).

    Example:
        >>> extract_boxed(r"so \\boxed{1} no wait \\boxed{\\frac{1}{2}}.")
        '\\\\frac{1}{2}'
        >>> extract_boxed(r"\\boxed{\\{1, 2\\}}"), extract_boxed(r"\\boxed{2"), extract_boxed("2")
        ('\\\\{1, 2\\\\}', None, None)
    """
    if not isinstance(text, str):
        return None
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    depth, i = 1, start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


def format_reward(completions: list[str], think_open_in_prompt: bool = False, **kwargs) -> list[float]:
    """1.0 when a completion follows the R1 template, else 0.0.

    The template: optional whitespace, ``<think>``, non-empty reasoning, ``</think>``, then an
    answer holding a balanced, non-empty ``\\boxed{...}``; each tag exactly once, in that order.
    Empty reasoning scores 0 (a reward for skipping the reasoning would be learned quickly).

    r_format(y) = 1[ y ~ \\s* <think> .+ </think> .* \\boxed{.+} .* ]

    Args:
        think_open_in_prompt: the chat template already wrote ``<think>`` (QwQ, R1 templates),
            so the completion may start inside the reasoning block without the opening tag.

    Example:
        >>> format_reward(["<think> red 2 </think> \\\\boxed{2}", "\\\\boxed{2}", "<think></think> \\\\boxed{2}"])
        [1.0, 0.0, 0.0]
    """
    return [_format_ok(c, think_open_in_prompt) for c in completions]


def _format_ok(text, think_open_in_prompt: bool) -> float:
    if not isinstance(text, str):
        return 0.0
    text = text.strip()
    if text.count(_THINK_CLOSE) != 1:
        return 0.0
    n_open = text.count(_THINK_OPEN)
    if n_open == 0 and think_open_in_prompt:
        text = _THINK_OPEN + text
    elif n_open != 1 or not text.startswith(_THINK_OPEN):
        return 0.0
    reasoning, answer = text[len(_THINK_OPEN) :].split(_THINK_CLOSE)
    if not reasoning.strip():
        return 0.0
    boxed = extract_boxed(answer)
    return 1.0 if boxed is not None and boxed.strip() else 0.0


# ---------------------------------------------------------------------------------------------
# Answer normalisation and equivalence

_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,;:! ]|\\quad|\\qquad|~")
_WS = re.compile(r"\s+")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_WORDS = re.compile(r"^[a-z]{2,}( [a-z]+)*$")
# "b", "(b)", "b.", "b)", "b:" alone, or "(b) text", "b) text", "b. text", "b: text"
_LETTER = re.compile(r"^(?:\(([a-z])\)|([a-z])[.):]?)$|^(?:\(([a-z])\)|([a-z])[.):])\s+\S")
_CHOICE_PREFIX = re.compile(r"^(?:option|choice|answer)\s*[:\s]\s*")


def normalize_answer(text: str) -> str:
    """Lower-cased, whitespace-collapsed text without ``$``, ``\\text{}``-style wrappers, LaTeX
    spacing or a trailing period.

    Example:
        >>> normalize_answer(r" \\text{Blue}. "), normalize_answer(r"$\\mathrm{Yes}$")
        ('blue', 'yes')
    """
    s = str(text).strip()
    for _ in range(3):  # nested wrappers
        s2 = _TEXT_CMD.sub(r"\1", s)
        if s2 == s:
            break
        s = s2
    s = _SPACING.sub(" ", s).replace("$", "")
    s = _WS.sub(" ", s).strip().lower()
    while s.endswith("."):
        s = s[:-1].rstrip()
    return s


def _plain_number(s: str) -> float | None:
    t = s.replace(",", "") if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d*)?", s) else s
    return float(t) if _NUMBER.match(t) else None


def is_correct(pred: str, gold: str) -> bool:
    """``pred`` equals ``gold`` after normalisation, or is mathematically equivalent to it.

    Order (cheap first): normalised string equality; if both are plain numbers, numeric
    equality (and nothing else); if either is a word or phrase (``blue``, ``yes``), nothing
    else (math-verify would read ``no`` as the product ``n*o`` and accept ``on``); otherwise
    ``math_verify.verify(parse(gold), parse(pred))``.
    """
    p, g = normalize_answer(pred), normalize_answer(gold)
    if not p or not g:
        return False
    if p == g:
        return True
    pn, gn = _plain_number(p), _plain_number(g)
    if pn is not None and gn is not None:
        return abs(pn - gn) <= 1e-9 * max(1.0, abs(gn))
    if _WORDS.match(p) or _WORDS.match(g):
        return False
    return _math_equal(pred.strip(), gold.strip())


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@functools.lru_cache(maxsize=8192)
def _mv_parse(text: str, timeout: int | None):
    from math_verify import parse

    return tuple(parse("\\boxed{" + text + "}", parsing_timeout=timeout))


def _math_equal(pred: str, gold: str, timeout: int = 5) -> bool:
    """math-verify equivalence. Its timeouts use ``signal.alarm``, which only works on the main
    thread; elsewhere (reward worker threads) they are switched off (``None``)."""
    try:
        from math_verify import verify
    except ImportError:  # pragma: no cover - math-verify is a dependency
        return False
    t = timeout if _in_main_thread() else None
    try:
        g, p = _mv_parse(gold, t), _mv_parse(pred, t)
        if not g or not p:
            return False
        return bool(verify(list(g), list(p), timeout_seconds=t))
    except Exception:
        return False


def _letter(s: str, with_text: bool) -> str | None:
    m = _LETTER.match(s)
    if m is None:
        return None
    bare = m.group(1) or m.group(2)
    return bare if bare is not None else (m.group(3) or m.group(4)) if with_text else None


def _choice_index(pred: str, choices: list, letters: str, by_text: bool = True) -> int | None:
    """The option ``pred`` names: by letter (``B``, ``(B)``, ``b``, ``B.``, ``B)``, ``B) 2``) or by text."""
    p = _CHOICE_PREFIX.sub("", normalize_answer(pred))
    letter = _letter(p, with_text=True)
    if letter is not None and letter in letters:
        return letters.index(letter)
    if not by_text:
        return None
    for i, c in enumerate(choices):
        if c is not None and normalize_answer(str(c)) == p:
            return i
    return None


def _gold_index(gold: str, choices: list, letters: str) -> int | None:
    g = normalize_answer(gold)
    letter = _letter(g, with_text=False)
    if letter is not None and letter in letters:
        return letters.index(letter)
    for i, c in enumerate(choices):
        if c is not None and normalize_answer(str(c)) == g:
            return i
    return None


def accuracy_reward(
    completions: list[str], answer: list, choices: list | None = None, choice_text: bool = True, **kwargs
) -> list[float | None]:
    """1.0 when the last ``\\boxed{}`` of a completion holds the reference answer, else 0.0.

    r_acc(y) = 1[ extract_boxed(y) ≡ answer ], where ≡ is, for a record with ``choices`` (option
    texts for letters A, B, ...), "names the same option" by letter (``B``, ``(B)``, ``b``,
    ``B.``, ``B)``) or by the option's text; otherwise :func:`is_correct` (normalised string
    equality, numeric equality, math-verify equivalence). No box gives 0.0; a row whose
    ``answer`` is None gives None (not applicable).

    ``choice_text=False`` accepts the letter only: for prompts that say "answer with the letter",
    where boxing the option's text skips the step the question tests (GRPO on the tiny task
    learnt to box the count instead of its letter when the text was accepted).

    Example:
        >>> accuracy_reward(
        ...     ["<think>.</think> \\\\boxed{2}", "\\\\boxed{\\\\frac{1}{2}}", "\\\\boxed{(B)}", "\\\\boxed{2}", "no box", "\\\\boxed{1}"],
        ...     answer=["2", "0.5", "B", "B", "2", None],
        ...     choices=[None, None, ["1", "2", "3", "4"], ["1", "2", "3", "4"], None, None],
        ... )
        [1.0, 1.0, 1.0, 1.0, 0.0, None]
    """
    n = len(completions)
    if choices is None:
        choices = [None] * n
    out: list[float | None] = []
    for completion, gold, opts in zip(completions, answer, choices):
        if gold is None:
            out.append(None)
            continue
        pred = extract_boxed(completion)
        if pred is None or not pred.strip():
            out.append(0.0)
            continue
        gold = str(gold)
        if opts:
            letters = "abcdefghijklmnopqrstuvwxyz"[: len(opts)]
            gi = _gold_index(gold, opts, letters)
            if gi is not None:
                out.append(1.0 if _choice_index(pred, opts, letters, by_text=choice_text) == gi else 0.0)
                continue
        out.append(1.0 if is_correct(pred, gold) else 0.0)
    return out


def held_out_scores(completions: list[str], records: list[dict]) -> dict[str, list[float]]:
    """What validation and ``cli.py evaluate`` report, per completion against its record, each 0 or 1.

    ``accuracy`` (option texts accepted), ``accuracy_letter_only`` (multiple choice by its letter
    only) and ``format``; a reward that does not apply (None) counts as 0.
    """
    answers, choices = [r["answer"] for r in records], [r.get("choices") for r in records]

    def zero_for_none(xs):
        return [float(x or 0.0) for x in xs]

    return {
        "accuracy": zero_for_none(accuracy_reward(completions, answer=answers, choices=choices)),
        "accuracy_letter_only": zero_for_none(
            accuracy_reward(completions, answer=answers, choices=choices, choice_text=False)),
        "format": zero_for_none(format_reward(completions)),
    }
