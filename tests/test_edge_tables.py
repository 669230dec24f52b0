"""Validation and reward edge cases, each a row of inputs with the expected outcome.

Faults these catch (each passed the whole suite before, issue 22): records with an empty question
or a boolean answer accepted; numeric answer tolerance loosened from 1e-9 to 1e-2; a gold answer's
text read as an option letter. (The hallucination monitor's inclusive/exclusive threshold is
tabled in ``test_hallucination.py``, ``THRESHOLD_EDGES``.)
"""
from __future__ import annotations

import json

import pytest
from PIL import Image

from lightning_r1v2.data.records import MAX_QUESTION_CHARS, RecordError, read_records, validate_record
from lightning_r1v2.rewards import accuracy_reward, format_reward, grounding_reward
from lightning_r1v2.rewards.rules import is_correct

OK = {"id": "a", "image": "ok.png", "question": "How many red shapes are there?", "answer": "2"}

# (change to a good record, expected counter key or None when the record is kept)
RECORDS = [
    ({}, None),
    ({"question": ""}, "empty_field"),
    ({"question": "   \n\t"}, "empty_field"),
    ({"question": None}, "missing_field"),
    ({"question": ["How many?"]}, "wrong_type"),
    ({"question": "x" * MAX_QUESTION_CHARS}, None),  # the limit itself is allowed
    ({"question": "x" * (MAX_QUESTION_CHARS + 1)}, "too_long"),
    ({"question": "What is in <image>?"}, "image_placeholder"),
    ({"answer": True}, "wrong_type"),  # JSON true is not an answer (str(True) would be "True")
    ({"answer": False}, "wrong_type"),
    ({"answer": 0}, None),  # a number is fine, 0 included
    ({"answer": 2.5}, None),
    ({"answer": ""}, "empty_field"),
    ({"answer": " "}, "empty_field"),
    ({"answer": ["2"]}, "wrong_type"),
    ({"answer": {"value": 2}}, "wrong_type"),
    ({"answer": float("nan")}, "wrong_type"),  # json.loads reads NaN; "nan" would then be a right answer
    ({"answer": float("inf")}, "wrong_type"),
    ({"id": True}, "wrong_type"),  # a boolean is an int to Python, not an id
    ({"id": 7}, None),
    ({"id": 1.5}, "wrong_type"),
    ({"image": ""}, "wrong_type"),
    ({"image": []}, "wrong_type"),
    ({"image": ["ok.png", 3]}, "wrong_type"),
    ({"image": ["ok.png", "ok.png"]}, None),
    ({"image": "nope.png"}, "missing_image"),
    ({"choices": "ABCD"}, "wrong_type"),
    ({"choices": [{"text": "1"}]}, "wrong_type"),
    ({"choices": ["1", 2, 3.5]}, None),
    ({"choices": None}, None),
    ({"annotations": [1]}, "wrong_type"),
    ({"tests": {"in": 1}}, "wrong_type"),
    ({"response": 5}, "wrong_type"),
    ({"response": "<think> <IMG_CONTEXT> </think> \\boxed{2}"}, "image_placeholder"),
]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("records")
    Image.new("RGB", (8, 8), "white").save(folder / "ok.png")
    return folder


@pytest.mark.parametrize("change, kind", RECORDS, ids=[f"{json.dumps(c, default=str)[:40]}" for c, _ in RECORDS])
def test_record_validation(root, change, kind):
    problem = validate_record({**OK, **change}, root)
    assert (problem[0] if problem else None) == kind, problem


def test_a_bad_record_in_a_file_names_file_and_line(root):
    path = root / "data.jsonl"
    path.write_text(json.dumps(OK) + "\n" + json.dumps({**OK, "question": ""}) + "\n")
    with pytest.raises(RecordError, match=r"data\.jsonl:2: 'question' is empty"):
        read_records(path)
    kept, report = read_records(path, strict=False)
    assert len(kept) == 1 and report.skipped == {"empty_field": 1}


# (pred, gold, equal?): plain numbers are equal within 1e-9 relative to max(1, |gold|)
NUMBERS = [
    ("1.0000000001", "1", True),   # 1e-10 apart
    ("1.0000000009", "1", True),   # 9e-10 apart: just inside
    ("1.00000001", "1", False),    # 1e-8 apart
    ("1.001", "1", False),         # 1e-3: inside a loose 1e-2 tolerance, still wrong
    ("1.01", "1", False),
    ("0.99", "1", False),
    ("0", "0.000000001", True),    # |gold| < 1: the bound is 1e-9 absolute
    ("0", "0.00000001", False),
    ("1000000000.5", "1000000000", True),  # relative: 0.5 <= 1e-9 * 1e9
    ("1000000002", "1000000000", False),   # 2 > 1
    ("-2", "2", False),
    ("2", "+2", True),
    ("1,000", "1000", True),
    ("1,00", "100", False),  # not a thousands separator: not a plain number, and not equal
]


@pytest.mark.parametrize("pred, gold, equal", NUMBERS, ids=[f"{p} vs {g}" for p, g, _ in NUMBERS])
def test_numeric_tolerance(pred, gold, equal):
    assert is_correct(pred, gold) is equal


def box(s):
    return f"<think> r </think> \\boxed{{{s}}}"


# Gold answers of multiple-choice records: a bare letter ("B", "(B)", "b.") names an option; any other
# gold is an option's TEXT, even when it starts like a letter marker ("a) only" is option D's text).
TRICKY = ["none", "b) and c)", "all", "a) only"]
CHOICES = [
    (box("D"), "a) only", TRICKY, 1.0),
    (box("A"), "a) only", TRICKY, 0.0),
    (box("a) only"), "a) only", TRICKY, 0.0),  # a PREDICTION "x) text" is read by its letter (A), as "(C) 2" is
    (box("B"), "b) and c)", TRICKY, 1.0),
    (box("B"), "b.", TRICKY, 1.0),  # a bare letter with a period is a letter
    (box("B"), "(b)", TRICKY, 1.0),
    (box("C"), "all", TRICKY, 1.0),
    (box("all"), "C", TRICKY, 1.0),
    (box("all"), "C", None, 0.0),  # no choices: compared as text
    (box("E"), "E", TRICKY, 1.0),  # a letter past the options is not an option: plain equality
]


@pytest.mark.parametrize("completion, gold, choices, expected", CHOICES,
                         ids=[f"{c[0][-12:]} gold {c[1]}" for c in CHOICES])
def test_gold_answer_text_is_not_read_as_a_letter(completion, gold, choices, expected):
    assert accuracy_reward([completion], answer=[gold], choices=[choices]) == [expected]


def test_letter_only_scoring_refuses_option_text():
    out = accuracy_reward([box("a) only"), box("D")], answer=["a) only"] * 2, choices=[TRICKY] * 2, choice_text=False)
    assert out == [0.0, 1.0]


COUNTS = {"counts": {"red": 2, "green": 0, "blue": 1}}
# (reasoning, complete, expected): 1 - (false + missing) / (claims + missing)
GROUNDING = [
    ("red 2 green 0 blue 1", True, 1.0),
    ("red 2 green 0", True, 1 - 1 / 3),          # blue missing
    ("red 2 green 0", False, 1.0),               # precision only
    ("red 3 green 0 blue 1", True, 1 - 1 / 3),   # one false
    ("red 2 green 0 blue 1 purple 0", True, 1.0),  # a colour absent from the scene, claimed 0: true
    ("red 2 green 0 blue 1 purple 1", True, 1 - 1 / 4),  # claimed present: false
    ("I see shapes", True, 0.0),                 # no claim at all
    ("", True, 0.0),
]


@pytest.mark.parametrize("reasoning, complete, expected", GROUNDING, ids=[f"{r or 'empty'}-{c}" for r, c, _ in GROUNDING])
def test_grounding_edges(reasoning, complete, expected):
    out = grounding_reward([f"<think> {reasoning} </think> \\boxed{{2}}"], annotations=[COUNTS], complete=complete)
    assert out == [pytest.approx(expected)]


# (completion, format reward): <think> non-empty reasoning </think> then a non-empty box, each tag once
FORMAT = [
    ("<think> r </think> \\boxed{2}", 1.0),
    ("  <think> r </think> \\boxed{2}  ", 1.0),
    ("<think> r </think> b </think> \\boxed{2}", 0.0),  # two closing tags
    ("<think> r <think> s </think> \\boxed{2}", 0.0),  # two opening tags
    ("x <think> r </think> \\boxed{2}", 0.0),  # text before the reasoning
    ("</think> r <think> \\boxed{2}", 0.0),  # tags in the wrong order
    ("<think> \\boxed{2} </think>", 0.0),  # the box inside the reasoning only
    ("<think> r </think> \\boxed{ }", 0.0),  # an empty box
    ("<think> r </think> \\boxed{2", 0.0),  # an unbalanced box
    ("<think>\n</think> \\boxed{2}", 0.0),  # empty reasoning
]


@pytest.mark.parametrize("completion, expected", FORMAT, ids=[c for c, _ in FORMAT])
def test_format_edges(completion, expected):
    assert format_reward([completion]) == [expected]
