"""Hallucination detectors on hand-written completions; the monitor's actions on crafted Rollouts."""

import logging
import math
from types import SimpleNamespace

import pytest
import torch

from lightning_r1v2.callbacks.hallucination import (
    HallucinationMonitor,
    contradicted_claims,
    denies_seeing,
    empty_reasoning,
    rates,
)
from lightning_r1v2.rollout.types import Rollouts

COUNTS = {"counts": {"red": 2, "green": 0, "blue": 3}}
GOOD = "<think> red 2 green 0 blue 3 </think> \\boxed{2}"  # the synthetic reference response
WRONG = "<think> red 1 green 0 blue 3 </think> \\boxed{1}"  # one false claim
DENY = "<think> I cannot see the image. </think> \\boxed{2}"  # no claims, a denial
EMPTY = "\\boxed{2}"  # an answer with no reasoning


# -- detectors ---------------------------------------------------------------------------------------


def test_contradicted_claims():
    assert contradicted_claims(GOOD, COUNTS) == (0, 3)
    assert contradicted_claims(WRONG, COUNTS) == (1, 3)
    # number words and case: Red two (true), GREEN one (false: 0), blue: 3 (true)
    assert contradicted_claims("<think> Red two, GREEN one, blue: 3 </think>", COUNTS) == (1, 3)
    # a colour not in the scene: false when stated with a count > 0, true with 0
    assert contradicted_claims("<think> red 2 purple 2 orange 0 </think>", COUNTS) == (1, 3)
    # claims outside the reasoning block are not read; no claims, no annotations -> (0, 0)
    assert contradicted_claims("<think> red 2 </think> blue 9 \\boxed{9}", COUNTS) == (0, 1)
    assert contradicted_claims("<think> there are shapes </think>", COUNTS) == (0, 0)
    assert contradicted_claims(GOOD, None) == (0, 0)
    assert contradicted_claims(GOOD, {"objects": []}) == (0, 0)
    assert contradicted_claims("red 5 \\boxed{5}", COUNTS) == (0, 0)  # no reasoning block
    # the chat template opened the block: the text before </think> is the reasoning
    assert contradicted_claims("red 5 </think> \\boxed{5}", COUNTS) == (1, 1)
    # "infrared 2" is not a claim about red
    assert contradicted_claims("<think> infrared 2 </think>", COUNTS) == (0, 0)


def test_denies_seeing():
    for text in [
        DENY,
        "I CAN'T SEE THE IMAGE",
        "i can\u2019t see the image",  # curly apostrophe
        "There is no image attached.",
        "Sorry, I am unable to view\nattachments.",
        "I don't  see an image here",  # runs of whitespace
        "I'm not able to see the image",
    ]:
        assert denies_seeing(text), text
    for text in [GOOD, "the piano image shows", "an image of red shapes", ""]:
        assert not denies_seeing(text), text
    assert denies_seeing("The picture is blank", phrases=["picture is blank"])
    assert not denies_seeing(DENY, phrases=["picture is blank"])


def test_empty_reasoning():
    assert empty_reasoning(EMPTY)
    assert empty_reasoning("<think>   \n </think> \\boxed{2}")
    assert empty_reasoning("<think></think>\\boxed{2}")
    assert empty_reasoning("<think> \\boxed{2}")  # an unclosed block holding only the answer
    assert not empty_reasoning(GOOD)
    assert not empty_reasoning("counting... </think> \\boxed{2}")  # block opened by the template
    assert not empty_reasoning("<think></think> 2")  # no boxed answer: not an answer
    assert not empty_reasoning("")


def test_rates_by_hand():
    comps = [GOOD, WRONG, DENY, EMPTY, "<think> red 2 purple 1 </think> \\boxed{2}"]
    recs = [{"annotations": COUNTS}] * 5
    r = rates(comps, recs)
    # claim rows: GOOD (0/3), WRONG (1/3), last (1/2) -> 2 of 3 rows contradicted, 2 of 8 claims false
    assert r["contradiction_rate"] == pytest.approx(2 / 3, abs=1e-12)
    assert r["claim_error_rate"] == pytest.approx(2 / 8, abs=1e-12)
    assert r["denial_rate"] == pytest.approx(1 / 5, abs=1e-12)
    assert r["empty_reasoning_rate"] == pytest.approx(1 / 5, abs=1e-12)
    # no claims anywhere: contradiction rates are undefined (NaN); no annotations: no claims
    r = rates([DENY, EMPTY], [{}, {"annotations": None}])
    assert math.isnan(r["contradiction_rate"]) and math.isnan(r["claim_error_rate"])
    assert r["denial_rate"] == 0.5


# -- the monitor --------------------------------------------------------------------------------------


def make_rollouts(completions, annotations=COUNTS):
    n = len(completions)
    return Rollouts(
        prompt_ids=torch.ones(n, 3, dtype=torch.long),
        prompt_mask=torch.ones(n, 3, dtype=torch.long),
        completion_ids=torch.ones(n, 4, dtype=torch.long),
        completion_mask=torch.ones(n, 4, dtype=torch.long),
        media=[{'pixel_values': torch.zeros(1, 3, 4, 4)} for _ in range(n)],
        completions=list(completions),
        records=[{"id": i, "annotations": annotations} for i in range(n)],
        group_ids=torch.arange(n) // 4,
        group_size=4,
    )


class FakeReward:
    def __init__(self, name, weight=1.0):
        self.name, self.weight = name, weight

    def score(self, rollouts):
        return torch.zeros(len(rollouts))


def trainer_at(step, *callbacks):
    return SimpleNamespace(global_step=step, callbacks=list(callbacks), should_stop=False)


BAD = make_rollouts([WRONG, WRONG, GOOD, GOOD, DENY, DENY, EMPTY, GOOD])  # contradiction 2/5
CLEAN = make_rollouts([GOOD] * 8)


def test_stats_keys_and_values():
    mon = HallucinationMonitor(thresholds={})
    mon.on_rewards(trainer_at(0), None, BAD)
    assert mon.last_stats == pytest.approx(
        {
            "hallucination/contradiction_rate": 2 / 5,  # rows with claims: WRONG x2, GOOD x3
            "hallucination/claim_error_rate": 2 / 15,
            "hallucination/denial_rate": 2 / 8,
            "hallucination/empty_reasoning_rate": 1 / 8,
        }
    )


def test_warn(caplog):
    mon = HallucinationMonitor(thresholds={"denial": 0.2, "contradiction": 0.9})
    with caplog.at_level(logging.WARNING, logger="lightning_r1v2.callbacks.hallucination"):
        mon.on_rewards(trainer_at(7), None, BAD)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1  # once per step
    assert "denial_rate 0.25 > threshold 0.2" in msgs[0] and "step 7" in msgs[0]
    assert "contradiction" not in msgs[0]  # 0.4 is under 0.9
    caplog.clear()
    mon.on_rewards(trainer_at(8), None, CLEAN)
    assert not caplog.records and mon.n_acted == 1


def test_scale_reward_halves_weight_each_step(caplog):
    acc, fmt = FakeReward("acc"), FakeReward("format")
    trainer = trainer_at(0, fmt, acc, object())
    mon = HallucinationMonitor(thresholds={"contradiction": 0.3}, action="scale_reward", reward_name="acc")
    mon.setup(trainer, None, "fit")
    weights = []
    with caplog.at_level(logging.WARNING):
        for step in range(2):
            trainer.global_step = step
            mon.on_rewards(trainer, None, BAD)
            weights.append(acc.weight)
    assert weights == [0.5, 0.25] and fmt.weight == 1.0
    assert mon.last_stats["hallucination/reward_weight"] == 0.25
    assert "'acc' weight 0.5 -> 0.25" in caplog.records[-1].getMessage()
    # floored at min_weight
    acc.weight = 1.0
    mon = HallucinationMonitor(
        thresholds={"contradiction": 0.3}, action="scale_reward", reward_name="acc", min_weight=0.3
    )
    for _ in range(3):
        mon.on_rewards(trainer, None, BAD)
    assert acc.weight == 0.3


def test_scale_reward_unknown_name_fails_early():
    mon = HallucinationMonitor(action="scale_reward", reward_name="model")
    with pytest.raises(ValueError, match="no reward callback named 'model'.*'acc'"):
        mon.setup(trainer_at(0, FakeReward("acc")), None, "fit")
    with pytest.raises(ValueError, match="reward_name"):
        HallucinationMonitor(action="scale_reward")


def test_stop(caplog):
    mon = HallucinationMonitor(thresholds={"empty_reasoning": 0.1}, action="stop")
    trainer = trainer_at(3)
    with caplog.at_level(logging.ERROR):
        mon.on_rewards(trainer, None, BAD)  # empty_reasoning 1/8 = 0.125 > 0.1
    assert trainer.should_stop is True
    assert "empty_reasoning_rate 0.125 > threshold 0.1" in mon.stopped_reason
    assert "step 3" in mon.stopped_reason
    assert any(r.levelno == logging.ERROR and "threshold 0.1" in r.getMessage() for r in caplog.records)


def test_patience_needs_consecutive_steps():
    acc = FakeReward("acc")
    trainer = trainer_at(0, acc)
    mon = HallucinationMonitor(thresholds={"denial": 0.1}, action="scale_reward", reward_name="acc", patience=2)
    seen = []
    for batch in [BAD, CLEAN, BAD, BAD, BAD, BAD]:  # over, under (reset), over, over -> act, ...
        mon.on_rewards(trainer, None, batch)
        seen.append(acc.weight)
    assert seen == [1.0, 1.0, 1.0, 0.5, 0.5, 0.25]
    assert mon.n_acted == 2


def test_state_dict_restores_streaks_and_weight():
    acc = FakeReward("acc")
    mon = HallucinationMonitor(thresholds={"denial": 0.1}, action="scale_reward", reward_name="acc", patience=2)
    trainer = trainer_at(0, acc)
    for batch in [BAD, BAD, BAD]:  # act at the 2nd step, streak 1 after the 3rd
        mon.on_rewards(trainer, None, batch)
    state = mon.state_dict()
    assert state["streaks"] == {"denial": 1} and state["n_acted"] == 1 and state["weight"] == 0.5

    fresh = FakeReward("acc")  # the resumed run builds its callbacks from the config again
    resumed = HallucinationMonitor(thresholds={"denial": 0.1}, action="scale_reward", reward_name="acc", patience=2)
    resumed.load_state_dict(state)
    resumed.on_rewards(trainer_at(3, fresh), None, BAD)  # restored weight 0.5, then streak 2 -> act
    assert fresh.weight == 0.25 and resumed.n_acted == 2


def test_counts_summed_over_ranks():
    class TwoRanks:  # the other rank saw 8 clean rows
        root_device = torch.device("cpu")

        def reduce(self, t, reduce_op):
            assert reduce_op == "sum"
            other = torch.tensor([8, 8, 0, 0, 24, 0, 0], dtype=t.dtype)  # counts in hallucination_counts order
            return t + other

    trainer = SimpleNamespace(global_step=0, callbacks=[], should_stop=False, world_size=2, strategy=TwoRanks())
    mon = HallucinationMonitor(thresholds={})
    mon.on_rewards(trainer, None, BAD)
    assert mon.last_stats["hallucination/denial_rate"] == pytest.approx(2 / 16)
    assert mon.last_stats["hallucination/contradiction_rate"] == pytest.approx(2 / 13)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(thresholds={"hallucination": 0.1}),
        dict(thresholds={"denial": 1.5}),
        dict(action="explode"),
        dict(scale=2.0),
        dict(min_weight=-1.0),
        dict(patience=0),
    ],
)
def test_settings_validated(kwargs):
    with pytest.raises(ValueError):
        HallucinationMonitor(**kwargs)


# (rate name, threshold, acts?) on BAD: contradiction 2/5 = 0.4, denial 2/8 = 0.25, empty 1/8 = 0.125.
# "Exceeds" is strictly above: a rate equal to its threshold does not act.
THRESHOLD_EDGES = [
    ("contradiction", 0.4, False),
    ("contradiction", 0.39, True),
    ("denial", 0.25, False),
    ("denial", 0.24, True),
    ("empty_reasoning", 0.125, False),
    ("empty_reasoning", 0.12, True),
    ("claim_error", 2 / 15, False),
    ("claim_error", 0.13, True),
    ("denial", 0.0, True),
    ("denial", 1.0, False),
]


@pytest.mark.parametrize("name, threshold, acts", THRESHOLD_EDGES, ids=[f"{n}-{t:.3g}" for n, t, _ in THRESHOLD_EDGES])
def test_threshold_is_exclusive(name, threshold, acts):
    mon = HallucinationMonitor(thresholds={name: threshold}, action="stop")
    trainer = trainer_at(0)
    mon.on_rewards(trainer, None, BAD)
    assert trainer.should_stop is acts and mon.n_acted == int(acts)
