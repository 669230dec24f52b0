"""The sampling jobs: pair selection (threshold, cap, dedupe, ties), build-pairs and prefilter end to end."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_r1v2.data.pairs import read_pairs
from lightning_r1v2.data.records import read_records
from lightning_r1v2.jobs.build_pairs import build_pairs, select_pairs
from lightning_r1v2.jobs.prefilter import prefilter
from lightning_r1v2.jobs.sampling import build_reward_callbacks

ROOT = Path(__file__).resolve().parents[1]

# Deterministic fake accuracy: the first PASSES[id] samples of each record pass, the others fail.
PASSES: dict[str, int] = {}


def fake_accuracy(completions, id, **kwargs):
    seen: dict[str, int] = {}
    out = []
    for rid in id:
        k = seen.get(rid, 0)
        seen[rid] = k + 1
        out.append(1.0 if k < PASSES.get(rid, 0) else 0.0)
    return out


def _fake_rewards():
    return [{"class_path": "lightning_r1v2.rewards.RewardCallback",
             "init_args": {"fn": fake_accuracy, "name": "accuracy", "weight": 1.0}}]


# ------------------------------------------------------------------------------ select_pairs
def test_select_pairs_threshold_and_ties():
    # rewards [1, 0, 1, 0.2]; threshold 0.5 -> chosen {0, 2}, rejected {1, 3};
    # gap 1.0: (0,1), (2,1); gap 0.8: (0,3), (2,3). 0.2 - 0 = 0.2 < 0.5: (3,1) is not a pair.
    pairs = select_pairs(["a", "b", "c", "d"], [1.0, 0.0, 1.0, 0.2], threshold=0.5, max_pairs=0)
    assert [(c, r) for c, r, _ in pairs] == [(0, 1), (2, 1), (0, 3), (2, 3)]
    assert [g for _, _, g in pairs] == pytest.approx([1.0, 1.0, 0.8, 0.8])
    # threshold 0.9 keeps only the full-gap pairs; a gap exactly at the threshold counts
    assert [(c, r) for c, r, _ in select_pairs(list("abcd"), [1.0, 0.0, 1.0, 0.2], 0.9, 0)] == [(0, 1), (2, 1)]
    assert len(select_pairs(list("abcd"), [1.0, 0.0, 1.0, 0.2], 0.8, 0)) == 4


def test_select_pairs_dedupes_and_caps_largest_gap_first():
    texts = ["good", "good", "bad1", "bad1", "bad2", "meh", "good2"]
    rewards = [1.0, 1.0, 0.0, 0.0, 0.0, 0.4, 1.0]
    pairs = select_pairs(texts, rewards, threshold=0.5, max_pairs=0)
    # distinct chosen {0, 6} x distinct rejected {2, 4, 5}: 6 pairs; the repeated texts (1, 3) never appear
    assert len(pairs) == 6 and not {c for c, _, _ in pairs} & {1, 3} and not {r for _, r, _ in pairs} & {1, 3}
    capped = select_pairs(texts, rewards, threshold=0.5, max_pairs=3)
    # the 4 gap-1.0 pairs come before the 0.6 ones; ties spread over answers: (0,2), then (0,4), (6,2)
    assert [(c, r) for c, r, _ in capped] == [(0, 2), (0, 4), (6, 2)]
    assert all(g == pytest.approx(1.0) for _, _, g in capped)
    assert select_pairs(["x"] * 4, [1, 0, 1, 0], 0.5, 15) == []  # one distinct text: nothing to pair
    with pytest.raises(ValueError, match="threshold must be > 0"):
        select_pairs(["a"], [1.0], 0.0, 1)


def test_reward_callbacks_from_yaml_style_dicts():
    cbs = build_reward_callbacks(None)  # default: 0.8 accuracy + 0.2 format
    assert [(cb.name, cb.weight) for cb in cbs] == [("accuracy", 0.8), ("format", 0.2)]
    spec = {"class_path": "lightning_r1v2.rewards.RewardCallback",
            "init_args": {"fn": "lightning_r1v2.rewards.format_reward", "name": "f"}}
    with pytest.raises(ValueError, match="distinct"):
        build_reward_callbacks([spec, spec])
    with pytest.raises(ValueError, match="class_path"):
        build_reward_callbacks([{"fn": "x"}])


# ------------------------------------------------------------------------------ jobs end to end
@pytest.fixture(scope="module")
def pass_counts(tiny_data):
    records, _ = read_records(tiny_data / "train.jsonl")
    counts = [0, 4, 1, 2, 3, 4]  # of 4 samples: all fail, all pass, mixed ...
    PASSES.clear()
    PASSES.update({r["id"]: c for r, c in zip(records, counts)})
    return records[: len(counts)], counts


def test_build_pairs_respects_threshold_cap_and_reports(tiny_data, tmp_path, pass_counts):
    records, counts = pass_counts
    out = tmp_path / "out" / "pairs.jsonl"
    rep = build_pairs("tiny", data=str(tiny_data / "train.jsonl"), out=str(out), num_samples=4, temperature=1.5,
                      max_new_tokens=6, threshold=0.5, max_pairs_per_question=3, rewards=_fake_rewards(),
                      batch_size=3, limit=len(records), seed=0)
    # random 6-token samples are all distinct, so question i has min(cap, p * (4 - p)) pairs
    expected = [min(3, c * (4 - c)) for c in counts]  # [0, 0, 3, 3, 3, 0]
    assert rep["questions"] == 6 and rep["questions_without_pair"] == 3
    assert rep["pairs"] == sum(expected) and rep["pairs_per_question_max"] == 3
    assert rep["share_correct"] == pytest.approx(sum(counts) / 24) and rep["mean_gap"] == pytest.approx(1.0)
    assert json.loads((tmp_path / "out" / "pairs.report.json").read_text())["pairs"] == rep["pairs"]
    pairs, _ = read_pairs(out)  # images resolve from the pairs file's own folder
    assert len(pairs) == rep["pairs"]
    by_id = {}
    for p in pairs:
        assert p["chosen_reward"] - p["rejected_reward"] >= 0.5 and p["gap"] == pytest.approx(1.0)
        assert p["chosen"] != p["rejected"] and "response" not in p
        by_id[p["id"]] = by_id.get(p["id"], 0) + 1
    assert by_id == {r["id"]: n for r, n in zip(records, expected) if n}
    # written next to the data, images stay relative to it
    out2 = tiny_data / "pairs_job.jsonl"
    build_pairs("tiny", data=str(tiny_data / "train.jsonl"), out=str(out2), num_samples=2, max_new_tokens=2,
                rewards=_fake_rewards(), limit=3)
    rows = [json.loads(line) for line in out2.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["id"] == records[2]["id"]  # 1 of 2 samples passes: one pair
    assert rows[0]["image"] == records[2]["image_rel"]  # "images/train/...", relative to the data folder


def test_prefilter_keeps_exactly_the_mixed_prompts(tiny_data, tmp_path, pass_counts):
    records, counts = pass_counts
    out = tmp_path / "kept.jsonl"
    rep = prefilter("tiny", data=str(tiny_data / "train.jsonl"), out=str(out), k=4, max_new_tokens=3,
                    rewards=_fake_rewards(), batch_size=4, limit=len(records))
    mixed = [r["id"] for r, c in zip(records, counts) if 0 < c < 4]
    kept, _ = read_records(out)  # same record format, images resolvable
    assert [r["id"] for r in kept] == mixed
    assert [r["pass_rate"] for r in kept] == [c / 4 for c in counts if 0 < c < 4]
    assert rep["pass_counts"] == {"0/4": 1, "1/4": 1, "2/4": 1, "3/4": 1, "4/4": 2}
    assert (rep["kept"], rep["dropped_all_pass"], rep["dropped_all_fail"]) == (3, 2, 1)
    assert json.loads(out.with_name("kept.report.json").read_text())["kept"] == 3
    with pytest.raises(ValueError, match="pass_reward"):
        prefilter("tiny", data=str(tiny_data / "train.jsonl"), out=str(out), rewards=_fake_rewards(),
                  pass_reward="nope", limit=1)


@pytest.mark.parametrize("job", ["build_pairs", "prefilter"])
def test_job_configs_parse_with_the_cli(job):
    name = job.replace("_", "-")
    out = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), name, "--config", str(ROOT / "configs" / "tiny" / f"{job}.yaml"),
         "--print_config"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert "ckpt_path: runs/" in out.stdout
