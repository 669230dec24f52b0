"""Bad inputs: every case gets a clear error naming file and line (strict) or a counted skip
(lenient); rewards and completions that go wrong give a message or a stated value, never a crash
without a message nor a silent wrong number. The data files are in ``tests/data/bad/``."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from lightning_r1v2.data.records import RecordError, read_records

BAD = Path(__file__).resolve().parent / "data" / "bad"

# file -> (skip counter key, words the strict error must contain); the bad record is on line 2
CASES = {
    "bad_json.jsonl": ("bad_json", "bad JSON (Expecting ',' delimiter"),
    "missing_field.jsonl": ("missing_field", "missing field 'answer'"),
    "missing_image.jsonl": ("missing_image", "image not found"),
    "truncated_png.jsonl": ("bad_image", "image cannot be decoded (OSError: image file is truncated"),
    "not_an_image.jsonl": ("bad_image", "image cannot be decoded (UnidentifiedImageError"),
    "zero_byte_image.jsonl": ("bad_image", "image is an empty file"),
    "long_question.jsonl": ("too_long", "'question' has 10000 characters (limit 4000)"),
    "empty_answer.jsonl": ("empty_field", "'answer' is empty"),
    "non_utf8.jsonl": ("not_utf8", "line is not valid UTF-8 (invalid start byte at byte 61)"),
    "placeholder_in_question.jsonl": ("image_placeholder", "'question' contains the image placeholder text <IMG_CONTEXT>"),
    "extra_placeholders.jsonl": ("image_placeholder", "'question' contains the image placeholder text <img>, </img>"),
    "placeholder_no_image.jsonl": ("image_placeholder", "'question' contains the image placeholder text <image>"),
}


def test_every_file_of_the_corpus_has_a_case():
    files = {p.name for p in BAD.glob("*.jsonl")}
    assert files == set(CASES) | {"empty.jsonl"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_strict_names_file_and_line(name):
    kind, words = CASES[name]
    with pytest.raises(RecordError) as e:
        read_records(BAD / name, strict=True)
    msg = str(e.value)
    assert msg.startswith(f"{BAD / name}:2: ") and words in msg, msg


@pytest.mark.parametrize("name", sorted(CASES))
def test_lenient_skips_and_counts(name, caplog):
    kind, words = CASES[name]
    with caplog.at_level(logging.WARNING, logger="lightning_r1v2.data"):
        records, report = read_records(BAD / name, strict=False)
    assert [r["id"] for r in records] == ["good-1"]
    assert dict(report.skipped) == {kind: 1}
    assert f"{name}:2: " in caplog.text and f"kept 1, skipped 1 ({kind}: 1)" in caplog.text


def test_zero_byte_records_file_is_an_error_naming_it():
    from lightning_r1v2.data.datamodule import R1V2DataModule

    records, report = read_records(BAD / "empty.jsonl")
    assert records == [] and report.total_skipped == 0  # nothing in it, nothing skipped
    dm = R1V2DataModule(train_file=str(BAD / "empty.jsonl"), val_file=None, kind="prompts")
    with pytest.raises(ValueError, match=f"{BAD / 'empty.jsonl'}: no usable training records"):
        dm.setup("fit")


def test_a_placeholder_in_the_question_would_reach_the_model(processor):
    """Why the check exists: the processor counts placeholders and refuses (with no file or line)."""
    from lightning_r1v2.data.collate import PromptCollator

    records, _ = read_records(BAD / "placeholder_in_question.jsonl", strict=False)
    bad = dict(records[0], question="<IMG_CONTEXT>\nWhich colour is most frequent?")
    with pytest.raises(ValueError, match="IMG_CONTEXT"):
        PromptCollator(processor)([bad])


def test_placeholder_in_an_sft_response_is_rejected(tmp_path):
    import json
    import shutil

    shutil.copy(BAD / "ok.png", tmp_path / "ok.png")
    rec = {"id": "r", "image": "ok.png", "question": "Which colour?", "answer": "red",
           "response": "<think> <img> red </think> \\boxed{red}"}
    (tmp_path / "sft.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(RecordError, match=r"sft.jsonl:1: 'response' contains the image placeholder text <img>"):
        read_records(tmp_path / "sft.jsonl")


# ---------------------------------------------------------------------------------- rewards
def _rollouts(completions: list[str], group_size: int = 2, records=None):
    from lightning_r1v2.rollout.types import Rollouts

    n = len(completions)
    records = records or [{"id": f"p{i // group_size}", "answer": "2"} for i in range(n)]
    return Rollouts(
        prompt_ids=torch.ones(n, 3, dtype=torch.long), prompt_mask=torch.ones(n, 3, dtype=torch.long),
        completion_ids=torch.ones(n, 2, dtype=torch.long), completion_mask=torch.ones(n, 2, dtype=torch.long),
        media=[{}] * len(completions), completions=completions, records=records,
        group_ids=torch.arange(n) // group_size, group_size=group_size,
    )


def nan_on_second_row(completions, **_):
    return [math.nan if i == 1 else 1.0 for i in range(len(completions))]


def always_nan(completions, **_):
    return [math.nan] * len(completions)


def test_a_nan_reward_is_a_counted_fault_scored_zero(caplog):
    from lightning_r1v2.rewards import RewardCallback, combine_rewards

    cb = RewardCallback(nan_on_second_row, max_failure_share=0.5)
    r = _rollouts(["a", "b", "c", "d"])
    with caplog.at_level(logging.ERROR, logger="lightning_r1v2.rewards"):
        col = cb.score(r)
    assert col.tolist() == [1.0, 0.0, 1.0, 1.0]  # the NaN row scores 0, it does not poison the batch
    assert cb.faults_total == 1 and cb.last_stats["rewards/nan_on_second_row/faults"] == 1.0
    assert "reward 'nan_on_second_row' on sample id=p0: returned nan" in caplog.text
    assert torch.isfinite(combine_rewards({"nan_on_second_row": col}, mode="sum")).all()


def test_a_nan_reward_can_drop_its_group_from_the_loss():
    from lightning_r1v2.rewards import RewardCallback

    from lightning_r1v2.rewards.combine import score_columns

    cb = RewardCallback(nan_on_second_row, on_error="drop_group", max_failure_share=0.5)
    r = _rollouts(["a", "b", "c", "d"])
    score_columns(r, [cb])
    assert r.dropped.tolist() == [True, True, False, False]  # row 1's whole group leaves the loss


def test_a_reward_that_is_always_nan_stops_the_run_with_a_message():
    from lightning_r1v2.rewards import RewardCallback

    cb = RewardCallback(always_nan, name="judge")
    with pytest.raises(RuntimeError, match=r"reward 'judge' failed on 4/4 rows \(100%\), more than "
                                           r"max_failure_share=10%; e.g. sample id=p0: returned nan"):
        cb.score(_rollouts(["a", "b", "c", "d"]))


# ------------------------------------------------------------------------------ completions
def test_a_completion_of_only_special_tokens_scores_zero(processor):
    from lightning_r1v2.callbacks.hallucination import rates
    from lightning_r1v2.rewards import accuracy_reward, format_reward, grounding_reward
    from lightning_r1v2.rollout.hf_engine import blocked_token_ids, completion_mask_from_eos, decode_completions

    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids
    eos, pad = tok.eos_token_id, tok.pad_token_id
    completion_ids = torch.tensor([
        [ids("<think>"), ids("</think>"), ids("<|im_start|>"), eos, pad],  # markers, then the end
        [eos, pad, pad, pad, pad],                                         # stops at once
        [ids("<think>"), ids("<think>"), ids("<think>"), ids("<think>"), ids("<think>")],  # never ends
    ])
    mask, truncated = completion_mask_from_eos(completion_ids, eos)
    assert truncated.tolist() == [False, False, True]
    texts = decode_completions(tok, completion_ids, mask)
    assert texts == ["<think></think><|im_start|>", "", "<think>" * 5]
    records = [{"answer": "2", "annotations": {"counts": {"red": 2}}}] * 3
    assert accuracy_reward(texts, answer=["2"] * 3) == [0.0, 0.0, 0.0]
    assert format_reward(texts) == [0.0, 0.0, 0.0]
    assert grounding_reward(texts, annotations=[r["annotations"] for r in records]) == [0.0, 0.0, 0.0]  # no claims
    hal = rates(texts, records)
    assert hal["denial_rate"] == 0.0 and hal["empty_reasoning_rate"] == 0.0
    assert math.isnan(hal["contradiction_rate"])  # no claims made: NaN ("no data"), never a made-up 0
    # image placeholders cannot be sampled at all: the engine blocks them
    assert {ids("<IMG_CONTEXT>"), ids("<img>"), ids("</img>"), pad} <= set(blocked_token_ids(processor))
