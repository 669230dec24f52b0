"""RewardCallback's contract (columns, None, faults, drop_group, threshold, import path) and combine_rewards."""
import copy
import logging
import math
import pickle

import pytest
import torch

from lightning_r1v2.rewards import RewardCallback, accuracy_reward, combine_rewards, format_reward
from lightning_r1v2.rewards.combine import score_columns
from lightning_r1v2.rollout.types import Rollouts

LOGGER = "lightning_r1v2.rewards"


def make_rollouts(completions, records, group_size=2):
    n = len(completions)
    return Rollouts(
        prompt_ids=torch.zeros(n, 2, dtype=torch.long),
        prompt_mask=torch.ones(n, 2, dtype=torch.long),
        completion_ids=torch.zeros(n, 3, dtype=torch.long),
        completion_mask=torch.ones(n, 3, dtype=torch.long),
        media=[{}] * n,
        completions=list(completions),
        records=list(records),
        group_ids=torch.arange(n) // group_size,
        group_size=group_size,
    )


def box(s):
    return f"<think> r </think> \\boxed{{{s}}}"


RECORDS = [
    {"id": "q0", "answer": "2"},
    {"id": "q0", "answer": "2"},
    {"id": "q1", "answer": "B", "choices": ["1", "2", "3", "4"]},
    {"id": "q1", "answer": "B", "choices": ["1", "2", "3", "4"]},
]


# Module-level (picklable) reward functions for the tests.
def none_on_odd(completions, id, **kw):
    return [None if i % 2 else 1.0 for i in range(len(completions))]


def always_raises(completions, **kw):
    raise KeyError("no such column")


def raises_on_marker(completions, **kw):
    if any("BAD" in c for c in completions):
        raise ValueError("cannot parse BAD")
    return [0.5] * len(completions)


def nan_on_marker(completions, **kw):
    return [math.nan if "NAN" in c else 1.0 for c in completions]


def scaled(completions, scale=1.0, **kw):
    return [scale] * len(completions)


def test_columns_and_kwargs_reach_the_function():
    seen = {}

    def spy(completions, **kw):
        seen.update(kw)
        return [1.0] * len(completions)

    ro = make_rollouts([box(2), box(3), box("B"), box("C")], RECORDS)
    cb = RewardCallback(spy, name="spy", kwargs={"extra": 7})
    cb.score(ro)
    assert seen["answer"] == ["2", "2", "B", "B"]
    assert seen["choices"] == [None, None, ["1", "2", "3", "4"], ["1", "2", "3", "4"]]
    assert seen["id"] == ["q0", "q0", "q1", "q1"] and seen["extra"] == 7


def test_accuracy_and_format_columns():
    ro = make_rollouts([box(2), box(3), box("B"), "\\boxed{C}"], RECORDS)
    acc = RewardCallback(accuracy_reward)
    fmt = RewardCallback("lightning_r1v2.rewards.format_reward")  # YAML-style import path
    assert acc.name == "accuracy_reward" and fmt.name == "format_reward" and fmt.fn is format_reward
    a, f = acc.score(ro), fmt.score(ro)
    assert a.dtype == torch.float32 and a.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert f.tolist() == [1.0, 1.0, 1.0, 0.0]
    assert ro.rewards == {}  # score returns its column and changes nothing (the module stores it)
    score_columns(ro, [acc, fmt])
    assert set(ro.rewards) == {"accuracy_reward", "format_reward"} and torch.equal(ro.rewards["accuracy_reward"], a)
    assert acc.last_stats == {
        "rewards/accuracy_reward/mean": 0.5,
        "rewards/accuracy_reward/std": 0.5,  # population std of [1, 0, 1, 0]
        "rewards/accuracy_reward/faults": 0.0,
    }
    assert acc.calls_total == 8 and acc.faults_total == 0  # two calls of 4 rows (score, then score_columns)


def test_none_is_nan_not_a_fault():
    ro = make_rollouts(["a", "b", "c", "d"], RECORDS)
    cb = RewardCallback(none_on_odd)
    col = cb.score(ro)
    assert col[0] == 1.0 and col[1].isnan() and col[2] == 1.0 and col[3].isnan()
    assert cb.faults_total == 0
    assert cb.last_stats["rewards/none_on_odd/mean"] == 1.0 and cb.last_stats["rewards/none_on_odd/std"] == 0.0


def test_one_raising_row_is_isolated_and_zeroed(caplog):
    comps = ["ok"] * 19 + ["BAD"]
    records = [{"id": f"s{i}"} for i in range(20)]
    ro = make_rollouts(comps, records)
    cb = RewardCallback(raises_on_marker, max_failure_share=0.1)
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        col = cb.score(ro)
        cb.score(ro)  # the same error again is not logged again
    assert col[:19].tolist() == [0.5] * 19 and col[19] == 0.0
    assert cb.faults_total == 2 and cb.calls_total == 40
    assert cb.last_stats["rewards/raises_on_marker/faults"] == 1.0
    row_errors = [r for r in caplog.records if "cannot parse BAD" in r.getMessage() and "id=s19" in r.getMessage()]
    assert len(row_errors) == 1
    assert ro.dropped is None  # on_error="zero" drops nothing


def test_nan_is_a_fault_and_drop_group_marks_the_whole_group():
    comps = ["a", "NAN", "c", "d", "e", "f", "g", "h", "i", "j"]
    ro = make_rollouts(comps, [{"id": i} for i in range(10)], group_size=2)
    cb = RewardCallback(nan_on_marker, on_error="drop_group", max_failure_share=0.5)
    score_columns(ro, [cb])
    col = ro.rewards[cb.name]
    assert col[1] == 0.0 and not col.isnan().any()
    assert cb.last_dropped.tolist() == [True, True] + [False] * 8  # score returns; the module applies it
    assert ro.dropped.tolist() == [True, True] + [False] * 8
    assert cb.faults_total == 1


def test_drop_group_keeps_earlier_drops():
    ro = make_rollouts(["a", "b", "NAN", "d"], RECORDS)
    ro.dropped = torch.tensor([True, False, False, False])
    score_columns(ro, [RewardCallback(nan_on_marker, on_error="drop_group", max_failure_share=1.0)])
    assert ro.dropped.tolist() == [True, False, True, True]


def test_all_rows_raising_exceeds_the_threshold():
    ro = make_rollouts(["a", "b", "c", "d"], RECORDS)
    cb = RewardCallback(always_raises, name="broken")
    with pytest.raises(RuntimeError) as err:
        cb.score(ro)
    msg = str(err.value)
    assert "'broken'" in msg and "4/4" in msg and "100%" in msg and "KeyError" in msg and "id=q0" in msg
    assert cb.faults_total == 4


def test_threshold_is_a_share_of_the_batch():
    comps = ["BAD"] * 2 + ["ok"] * 8
    ro = make_rollouts(comps, [{"id": i} for i in range(10)])
    RewardCallback(raises_on_marker, max_failure_share=0.2).score(ro)  # 20% is not more than 20%
    with pytest.raises(RuntimeError, match="2/10"):
        RewardCallback(raises_on_marker, max_failure_share=0.1).score(ro)


def test_wrong_length_and_non_numbers_are_faults():
    ro = make_rollouts(["a", "b", "c", "d"], RECORDS)

    def wrong_length(completions, **kw):
        return [1.0]  # right only when called one row at a time

    assert RewardCallback(wrong_length).score(ro).tolist() == [1.0] * 4

    def words(completions, **kw):
        return ["x"] * len(completions)

    with pytest.raises(RuntimeError, match="non-number"):
        RewardCallback(words).score(ro)


def test_kwargs_win_over_columns_and_validation():
    ro = make_rollouts(["a", "b", "c", "d"], [{"scale": 1.0}] * 4)
    assert RewardCallback(scaled, kwargs={"scale": 3.0}).score(ro).tolist() == [3.0] * 4
    with pytest.raises(ValueError):
        RewardCallback(scaled, on_error="ignore")
    with pytest.raises(ValueError):
        RewardCallback(scaled, max_failure_share=2.0)
    with pytest.raises(ModuleNotFoundError):
        RewardCallback("no_such_module.fn")


def test_pickle_deepcopy_and_state_dict():
    cb = RewardCallback("lightning_r1v2.rewards.accuracy_reward", weight=0.8, group="acc")
    ro = make_rollouts([box(2), box(3), box("B"), box("C")], RECORDS)
    cb.score(ro)
    for clone in (pickle.loads(pickle.dumps(cb)), copy.deepcopy(cb)):
        assert clone.fn is accuracy_reward and clone.weight == 0.8 and clone.group == "acc"
        assert clone.score(ro).tolist() == [1.0, 0.0, 1.0, 0.0]
    state = cb.state_dict()
    assert state == {"calls_total": 4, "faults_total": 0, "weight": 0.8}
    fresh = RewardCallback(accuracy_reward)
    fresh.load_state_dict({**state, "weight": 0.5})
    assert fresh.calls_total == 4 and fresh.weight == 0.5
    # Two reward callbacks of the same class must not share a checkpoint slot.
    assert RewardCallback(format_reward).state_key != RewardCallback(accuracy_reward).state_key


# ---------------------------------------------------------------------------------------------
# combine_rewards, with hand numbers

NAN = math.nan


def cols(**kw):
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in kw.items()}


def test_combine_sum_is_r1v2_unweighted_sum_with_nan_as_zero():
    c = cols(rule=[1.0, 0.0, 1.0], rm=[0.5, -0.25, NAN], format=[1.0, 1.0, 0.0])
    # row 0: 1 + 0.5 + 1 = 2.5; row 1: 0 - 0.25 + 1 = 0.75; row 2: 1 + 0 (NaN) + 0 = 1.0
    out = combine_rewards(c, weights={"rule": 9.0}, mode="sum")  # weights ignored in sum mode
    torch.testing.assert_close(out, torch.tensor([2.5, 0.75, 1.0]), rtol=0, atol=1e-6)


def test_combine_weighted_is_r1v3():
    c = cols(acc=[1.0, 0.0, 1.0, NAN], format=[1.0, 1.0, 0.0, 1.0])
    # 0.8 acc + 0.2 format: [0.8 + 0.2, 0 + 0.2, 0.8 + 0, 0 + 0.2]
    out = combine_rewards(c, weights={"acc": 0.8, "format": 0.2}, mode="weighted")
    torch.testing.assert_close(out, torch.tensor([1.0, 0.2, 0.8, 0.2]), rtol=0, atol=1e-6)
    # a missing weight is 1.0
    torch.testing.assert_close(
        combine_rewards(c, weights={"acc": 0.5}), torch.tensor([1.5, 1.0, 0.5, 1.0]), rtol=0, atol=1e-6
    )


def test_combine_gate_ors_the_verifiers():
    c = cols(rule=[1.0, 0.0, 0.0, NAN], model=[0.0, NAN, 1.0, NAN], format=[1.0, 1.0, 0.0, 1.0])
    groups = {"rule": "acc", "model": "acc"}
    # acc = max over applicable of (rule, model) = [1, 0, 1, 0 (none applies)]
    # r = 0.8 acc + 0.2 format = [1.0, 0.2, 0.8, 0.2]
    out = combine_rewards(c, weights={"rule": 0.8, "model": 0.3, "format": 0.2}, mode="gate", groups=groups)
    torch.testing.assert_close(out, torch.tensor([1.0, 0.2, 0.8, 0.2]), rtol=0, atol=1e-6)


def test_combine_validates():
    with pytest.raises(ValueError):
        combine_rewards(cols(a=[1.0]), mode="product")
    with pytest.raises(ValueError):
        combine_rewards(cols(a=[1.0, 2.0], b=[1.0]))
    with pytest.raises(ValueError):
        combine_rewards({})


# ---------------------------------------------------------------------------------------------
# Reward faults from issue 17: hangs, exits, wrong return types, float32 overflow, mutation


def hangs_on_marker(completions, **kw):
    import time

    if any("HANG" in c for c in completions):
        time.sleep(5)
    return [1.0] * len(completions)


def exits(completions, **kw):
    import sys

    sys.exit(0)


def interrupts(completions, **kw):
    raise KeyboardInterrupt


def returns_dict(completions, **kw):
    return {c: 1.0 for c in completions}


def returns_str(completions, **kw):
    return "1" * len(completions)


def too_big_for_float32(completions, **kw):
    return [1e39 if "BIG" in c else 3.0e38 for c in completions]


def mutates(completions, annotations, **kw):
    for a in annotations:
        a["counts"]["red"] = 99
    annotations.clear()
    return [1.0] * len(completions)


def test_a_hanging_reward_is_a_counted_fault_naming_the_reward(caplog):
    ro = make_rollouts(["ok", "HANG", "ok", "ok"], RECORDS)
    cb = RewardCallback(hangs_on_marker, timeout_s=0.3, max_failure_share=1.0)
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        col = cb.score(ro)
    # the whole call hung: every row of it is a fault (row by row would repeat the hang)
    assert col.tolist() == [0.0] * 4 and cb.faults_total == 4
    assert any("'hangs_on_marker'" in r.getMessage() and "timed out after 0.3s" in r.getMessage() for r in caplog.records)
    with pytest.raises(RuntimeError, match=r"'hangs_on_marker' failed on 4/4 rows .*timed out after 0.3s"):
        RewardCallback(hangs_on_marker, timeout_s=0.3).score(ro)


def test_sys_exit_or_keyboard_interrupt_in_a_reward_stops_the_run_loudly():
    from lightning_r1v2.rewards import callback as cbmod

    ro = make_rollouts(["a", "b", "c", "d"], RECORDS)
    for timeout in (10.0, None):  # on the helper thread and inline
        with pytest.raises(cbmod.RewardAborted, match=r"reward 'exits' raised SystemExit\(0\) \(sys.exit\)"):
            RewardCallback(exits, timeout_s=timeout).score(ro)
    with pytest.raises(cbmod.RewardAborted, match="reward 'interrupts' raised KeyboardInterrupt"):
        RewardCallback(interrupts).score(ro)


@pytest.mark.parametrize("fn, what", [(returns_dict, "returned a dict"), (returns_str, "returned a str")])
def test_dict_or_str_returns_are_faults_not_lists(fn, what):
    ro = make_rollouts(["a", "b", "c", "d"], RECORDS)
    cb = RewardCallback(fn, max_failure_share=1.0)
    assert cb.score(ro).tolist() == [0.0] * 4 and cb.faults_total == 4
    with pytest.raises(RuntimeError, match=what):
        RewardCallback(fn).score(ro)


def test_string_rows_are_faults_even_when_they_parse_as_numbers():
    def strings(completions, **kw):
        return ["1.5"] * len(completions)

    ro = make_rollouts(["a", "b", "c", "d"], RECORDS)
    cb = RewardCallback(strings, max_failure_share=1.0)
    assert cb.score(ro).tolist() == [0.0] * 4 and cb.faults_total == 4


def test_finiteness_is_checked_in_float32():
    # 1e39 is finite in float64 but inf in float32; 3e38 fits (float32 max is about 3.4028e38)
    ro = make_rollouts(["BIG", "b", "c", "d"], RECORDS)
    cb = RewardCallback(too_big_for_float32, max_failure_share=0.25)
    col = cb.score(ro)
    assert col[0] == 0.0 and col[1:].tolist() == pytest.approx([3.0e38] * 3, rel=1e-6)
    assert cb.faults_total == 1 and torch.isfinite(col).all()


def test_rewards_get_copies_of_the_records():
    records = [{"id": i, "annotations": {"counts": {"red": 1}}} for i in range(4)]
    ro = make_rollouts(["a", "b", "c", "d"], records)
    assert RewardCallback(mutates).score(ro).tolist() == [1.0] * 4
    assert [r["annotations"]["counts"]["red"] for r in ro.records] == [1, 1, 1, 1]
    assert ro.columns()["annotations"] == [{"counts": {"red": 1}}] * 4


def test_reward_fault_rows_and_timeout_validation():
    from lightning_r1v2.rewards.faults import RewardFault

    def half_faulty(completions, **kw):
        return [RewardFault("malformed tests: tests[0]: ...") if i % 2 else 1.0 for i in range(len(completions))]

    cb = RewardCallback(half_faulty, max_failure_share=0.5)
    assert cb.score(make_rollouts(["a", "b", "c", "d"], RECORDS)).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert cb.faults_total == 2
    with pytest.raises(ValueError, match="timeout_s"):
        RewardCallback(scaled, timeout_s=0)


def test_the_helper_thread_keeps_the_callers_grad_mode():
    seen = []

    def modes(completions, **kw):
        seen.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
        return [1.0] * len(completions)

    ro = make_rollouts(["a", "b", "c", "d"], RECORDS)
    with torch.no_grad():
        RewardCallback(modes).score(ro)
    RewardCallback(modes).score(ro)
    with torch.inference_mode():
        RewardCallback(modes).score(ro)
    assert seen == [(False, False), (True, False), (False, True)]
