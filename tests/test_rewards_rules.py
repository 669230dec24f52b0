"""Rule rewards: extract_boxed, format_reward, accuracy_reward (a table of stated cases)."""
import pickle
from concurrent.futures import ThreadPoolExecutor

import pytest

from lightning_r1v2.rewards import accuracy_reward, extract_boxed, format_reward, normalize_answer

ABCD = ["1", "2", "3", "4"]


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"\boxed{2}", "2"),
        (r"a \boxed{1} then \boxed{3}", "3"),  # the last box is the answer
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not count
        (r"\boxed {x}", "x"),  # space before the brace
        (r"\fbox{7}", "7"),
        (r"\boxed{}", ""),  # empty, but balanced
        (r"\boxed{2", None),  # unbalanced
        (r"\boxed{1} and \boxed{2", None),  # the last one is unbalanced: no fallback to earlier ones
        ("2", None),
        ("", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "completion, expected",
    [
        (r"<think> red 2 green 0 blue 3 yellow 1 </think> \boxed{2}", 1.0),  # the synthetic reference
        ("  \n<think>\nsome steps\n</think>\nThe answer is \\boxed{\\frac{1}{2}}.\n ", 1.0),  # whitespace ok
        (r"\boxed{2}", 0.0),  # no reasoning block
        (r"<think> r </think> 2", 0.0),  # no box
        (r"<think></think> \boxed{2}", 0.0),  # empty reasoning
        (r"<think> r </think> \boxed{}", 0.0),  # empty box
        (r"<think> a </think><think> b </think> \boxed{2}", 0.0),  # two blocks
        (r"\boxed{2} <think> r </think>", 0.0),  # block not first
        (r"<think> r \boxed{2} </think>", 0.0),  # box only inside the reasoning
        (r"<think> r </think> \boxed{2", 0.0),  # unbalanced box
        (r"r </think> \boxed{2}", 0.0),  # missing <think> (not allowed by default)
    ],
)
def test_format_reward(completion, expected):
    assert format_reward([completion]) == [expected]


def test_format_reward_think_open_in_prompt():
    # QwQ-style templates write "<think>" in the prompt; the completion starts inside the block.
    assert format_reward([r"r </think> \boxed{2}"], think_open_in_prompt=True) == [1.0]
    assert format_reward([r"<think> r </think> \boxed{2}"], think_open_in_prompt=True) == [1.0]


def box(s: str) -> str:
    return f"<think> reasoning </think> \\boxed{{{s}}}"


# (completion, answer, choices, expected, why)
CASES = [
    # plain strings and numbers
    (box("2"), "2", None, 1.0, "same number"),
    (box("3"), "2", None, 0.0, "different number"),
    (box("2.0"), "2", None, 1.0, "numerically equal plain numbers"),
    (box("12"), "2", None, 0.0, "substring is not equality"),
    (box("-1"), "-1", None, 1.0, "negative number"),
    (box("1,000"), "1000", None, 1.0, "thousands separator"),
    (box("2."), "2", None, 1.0, "trailing period stripped"),
    (box(" 2 "), "2", None, 1.0, "surrounding whitespace"),
    ("<think> r </think> 2", "2", None, 0.0, "no box, no credit even if the text is right"),
    (r"<think> \boxed{2} </think> \boxed{3}", "2", None, 0.0, "only the last box counts"),
    (r"<think> \boxed{3} </think> \boxed{2}", "2", None, 1.0, "only the last box counts"),
    (box(""), "2", None, 0.0, "empty box"),
    (r"\boxed{2", "2", None, 0.0, "unbalanced box"),
    # words (colour, yes/no): case-insensitive normalised equality, never math-verify
    (box("blue"), "blue", None, 1.0, "same word"),
    (box("Blue"), "blue", None, 1.0, "case-insensitive"),
    (box("BLUE."), "blue", None, 1.0, "case and trailing period"),
    (box(r"\text{blue}"), "blue", None, 1.0, r"\text{} wrapper stripped"),
    (box("red"), "blue", None, 0.0, "different colour"),
    (box("yes"), "yes", None, 1.0, "yes"),
    (box("Yes"), "yes", None, 1.0, "capitalised yes"),
    (box("no"), "yes", None, 0.0, "no is not yes"),
    (box("on"), "no", None, 0.0, "an anagram: math-verify would read n*o == o*n, words skip it"),
    (box("dark  blue"), "Dark Blue", None, 1.0, "whitespace collapsed"),
    # mathematics through math-verify
    (box("1/2"), "0.5", None, 1.0, "fraction vs decimal"),
    (box(r"\frac{1}{2}"), "1/2", None, 1.0, "LaTeX fraction vs slash"),
    (box(r"\dfrac12"), "0.5", None, 1.0, "dfrac without braces"),
    (box(r"\frac{2}{4}"), r"\frac{1}{2}", None, 1.0, "unreduced fraction"),
    (box(r"\frac{1}{3}"), "1/2", None, 0.0, "different fraction"),
    (box("x=3"), "3", None, 1.0, "an assignment's right-hand side"),
    (box("x = 3"), "3", None, 1.0, "assignment with spaces"),
    (box("3x"), "3", None, 0.0, "3x is not 3"),
    (box(r"\frac{4}{2}"), "2", None, 1.0, "fraction equal to an integer"),
    (box("1+x"), "x+1", None, 1.0, "commuted sum"),
    (box(r"2^{1/2}"), r"\sqrt{2}", None, 1.0, "root as power"),
    (box("3.14159"), r"\pi", None, 0.0, "pi is not a rounded number"),
    (box(r"$\frac{1}{2}$"), "0.5", None, 1.0, "dollar signs inside the box"),
    # multiple choice: letter forms and option text
    (box("B"), "B", ABCD, 1.0, "the letter"),
    (box("(B)"), "B", ABCD, 1.0, "letter in parentheses"),
    (box("b"), "B", ABCD, 1.0, "lower-case letter"),
    (box("B."), "B", ABCD, 1.0, "letter with period"),
    (box("B)"), "B", ABCD, 1.0, "letter with closing parenthesis"),
    (box("(B) 2"), "B", ABCD, 1.0, "letter followed by the option text"),
    (box("2"), "B", ABCD, 1.0, "the option's text: choices[1] == '2'"),
    (box("C"), "B", ABCD, 0.0, "another letter"),
    (box("3"), "B", ABCD, 0.0, "another option's text"),
    (box("E"), "B", ABCD, 0.0, "a letter past the options"),
    (box("(C) 2"), "B", ABCD, 0.0, "the letter decides, not the trailing text"),
    (box("B"), "(B)", ABCD, 1.0, "reference written as (B)"),
    (box("B"), "2", ABCD, 1.0, "reference given as option text, answered by letter"),
    # not applicable
    (box("2"), None, None, None, "no reference answer: not applicable"),
]


@pytest.mark.parametrize("completion, answer, choices, expected, why", CASES, ids=[c[4] for c in CASES])
def test_accuracy_table(completion, answer, choices, expected, why):
    assert accuracy_reward([completion], answer=[answer], choices=[choices]) == [expected], why


def test_accuracy_batch_ignores_unknown_columns_and_missing_choices():
    out = accuracy_reward([box("2"), box("blue")], answer=["2", "red"], id=["a", "b"], tests=[None, None])
    assert out == [1.0, 0.0]


def test_accuracy_in_worker_threads():
    # math-verify's default timeouts use signal.alarm, which fails off the main thread.
    comps = [box("1/2"), box(r"\frac{1}{3}"), box("x=3")] * 4
    answers = ["0.5", "0.5", "3"] * 4
    with ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda i: accuracy_reward([comps[i]], answer=[answers[i]])[0], range(len(comps))))
    assert outs == [1.0, 0.0, 1.0] * 4


def test_reward_functions_pickle():
    for fn in (format_reward, accuracy_reward):
        assert pickle.loads(pickle.dumps(fn)) is fn


def test_normalize_answer():
    assert normalize_answer(r" \text{Blue}. ") == "blue"
    assert normalize_answer(r"$\mathrm{Yes}$") == "yes"
    assert normalize_answer("2.") == "2"


# grounding: 1 - (false + missing) / (claims + missing), worked by hand
COUNTS = {"red": 2, "green": 0, "blue": 1}


@pytest.mark.parametrize("reasoning, complete, expected, why", [
    ("red 2 green 0 blue 1", True, 1.0, "3 true claims, none missing: 1 - 0/3"),
    ("red 2 green 1 blue 1", True, 2 / 3, "green 1 is false: 1 - 1/3"),
    ("red 2 green 1", True, 1 / 3, "green false, blue missing: 1 - (1 + 1)/(2 + 1)"),
    ("red 0", True, 0.0, "red false, green and blue missing: 1 - (1 + 2)/(1 + 2)"),
    ("red 2", True, 1 / 3, "the hack of stating less: 1 true claim, 2 missing: 1 - 2/3"),
    ("red 2", False, 1.0, "precision only: the one claim is true"),
    ("red 2 green 0 blue 1 purple 3", True, 0.75, "purple is not in the scene: 1 - 1/4"),
    ("red two Green: 0 blue 1", True, 1.0, "number words, case and ':' are read"),
    ("I see shapes", True, 0.0, "no claim at all"),
])
def test_grounding_reward_by_hand(reasoning, complete, expected, why):
    from lightning_r1v2.rewards import grounding_reward

    text = f"<think> {reasoning} </think> \\boxed{{2}}"
    (got,) = grounding_reward([text], annotations=[{"counts": COUNTS}], complete=complete)
    assert got == pytest.approx(expected), why


def test_grounding_reward_without_annotations_is_none():
    from lightning_r1v2.rewards import grounding_reward

    assert grounding_reward(["<think> red 2 </think>"] * 2, annotations=[None, {"counts": {}}]) == [None, None]


def test_accuracy_letter_only_for_choice_questions():
    opts = ["0", "1", "2", "3"]  # gold B = "1"
    texts = ["\\boxed{B}", "\\boxed{(B)}", "\\boxed{1}", "\\boxed{C}", "\\boxed{2}", "\\boxed{B) 1}"]
    lenient = accuracy_reward(texts, answer=["B"] * 6, choices=[opts] * 6)
    strict = accuracy_reward(texts, answer=["B"] * 6, choices=[opts] * 6, choice_text=False)
    assert lenient == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]  # "1" is option B's text: accepted by default
    assert strict == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]  # the text alone is not the letter asked for
    # records without choices are untouched by the flag
    assert accuracy_reward(["\\boxed{2}"], answer=["2"], choice_text=False) == [1.0]
