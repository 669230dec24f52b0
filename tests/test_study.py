"""The study: its table from the cells' JSON, resume, the two-step question type, a real ``--quick``
run through cli.py, and (slow) the prefiltered GRPO variants at the quick scale."""
import csv
import json
import math
import statistics

import pytest

from lightning_r1v2 import study as S
from lightning_r1v2.data.synthetic import make_data
from lightning_r1v2.rewards import accuracy_reward, format_reward, grounding_reward


def _cell(task, variant, seed, acc, fmt=1.0, hall=0.02, seconds=10.0, rollouts=0):
    return {"task": task, "variant": variant, "seed": seed, "accuracy": acc, "accuracy_letter_only": acc,
            "format": fmt, "hallucination": hall, "accuracy_by_type": {}, "seconds": seconds, "cpu_seconds": seconds / 2,
            "rollouts": rollouts, "curve": [[0, acc / 2], [rollouts, acc]], "stages": []}


def _write(out, cell):
    p = S.cell_path(out, cell["task"], cell["variant"], cell["seed"])
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(cell))


def test_table_means_and_stds_from_cells(tmp_path):
    accs = [0.70, 0.74, 0.81]
    for seed, acc in enumerate(accs):
        cell = _cell("easy", "grpo", seed, acc, seconds=100 + seed, rollouts=5120)
        cell.update(effective_share=1.0, effective_share_before=0.3 + 0.1 * seed)  # with the buffer: after it
        _write(tmp_path, cell)
    # two seeds; one answered without a count claim anywhere: its hallucination rate is NaN
    _write(tmp_path, _cell("easy", "sft", 0, 0.60, hall=float("nan"), seconds=50))
    _write(tmp_path, _cell("easy", "sft", 1, 0.66, hall=0.04, seconds=54))
    _write(tmp_path, _cell("twostep", "sft", 0, 0.40))
    nossb = _cell("twostep", "grpo-nossb", 0, 0.5)
    nossb.update(effective_share=None, effective_share_before=0.35)  # no buffer: the batch as sampled
    _write(tmp_path, nossb)

    rows = S.summarise(tmp_path)
    assert [(r["task"], r["variant"], r["seeds"]) for r in rows] == [
        ("easy", "sft", 2), ("easy", "grpo", 3), ("twostep", "sft", 1), ("twostep", "grpo-nossb", 1)]
    grpo = rows[1]
    # mean 0.75; deviations -0.05, -0.01, 0.06; squares sum 0.0062; / (3 - 1) = 0.0031; sqrt = 0.0556776
    assert grpo["accuracy_mean"] == pytest.approx(0.75, abs=1e-12)
    assert grpo["accuracy_std"] == pytest.approx(math.sqrt(0.0031), abs=1e-12)
    assert grpo["accuracy_std"] == pytest.approx(statistics.stdev(accs), abs=1e-12)
    assert grpo["seconds_mean"] == pytest.approx(101.0) and grpo["rollouts_mean"] == 5120
    sft = rows[0]
    assert sft["accuracy_mean"] == pytest.approx(0.63) and sft["accuracy_std"] == pytest.approx(statistics.stdev([0.6, 0.66]))
    assert sft["hallucination_mean"] == pytest.approx(0.04) and sft["hallucination_std"] is None  # NaN left out
    assert rows[2]["accuracy_std"] is None  # one seed: no spread
    assert rows[3]["effective_share_mean"] == pytest.approx(0.35) and rows[2]["effective_share_mean"] is None

    md = S.report(tmp_path)
    lines = md.splitlines()
    assert lines[0].split("|")[1:-1] == [" task ", " variant ", " seeds ", " held-out accuracy ", " format rate ",
                                         " hallucination rate ", " effective samples ", " wall (s) ",
                                         " CPU (s) ", " rollouts "]
    assert "| easy | grpo | 3 | 75.0% ± 5.6 | 100.0% ± 0.0 | 2.0% ± 0.0 | 100.0% ± 0.0 | 101 | 50 | 5120 |" in lines
    assert "| twostep | sft | 1 | 40.0% | 100.0% | 2.0% | - | 10 | 5 | 0 |" in lines
    assert (tmp_path / "table.md").read_text().strip() == md
    with open(tmp_path / "table.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == S.COLUMNS and len(table) == 4
    assert float(table[1]["accuracy_std"]) == pytest.approx(statistics.stdev(accs))
    assert table[0]["hallucination_std"] == ""
    assert (tmp_path / "accuracy_vs_rollouts.png").stat().st_size > 10_000


def test_paired_differences_seed_by_seed(tmp_path):
    for seed, (sft, mpo) in enumerate([(0.60, 0.65), (0.66, 0.68)]):
        _write(tmp_path, _cell("easy", "sft", seed, sft))
        _write(tmp_path, _cell("easy", "mpo", seed, mpo))
    _write(tmp_path, _cell("easy", "mpo", 2, 0.99))  # no sft cell for seed 2: left out of the pairing
    rows = S.paired_differences(tmp_path)
    assert [(r["a"], r["b"], r["seeds"]) for r in rows] == [("mpo", "sft", [0, 1])]
    # differences +0.05, +0.02: mean 0.035; deviations +-0.015; sqrt(2 * 0.015^2 / 1) = 0.0212132
    assert rows[0]["diffs"] == pytest.approx([0.05, 0.02], abs=1e-12)
    assert rows[0]["mean"] == pytest.approx(0.035, abs=1e-12) and rows[0]["std"] == pytest.approx(0.0212132, abs=1e-7)
    md = S.report(tmp_path)
    # t = 0.035 / (0.0212132 / sqrt 2) = 2.333; the 95% critical value at 1 degree of freedom is 12.706
    assert rows[0]["t"] == pytest.approx(2.3333, abs=1e-4) and rows[0]["beyond_noise"] is False
    assert "| easy | mpo − sft (MPO adds) | 2 | +5.0, +2.0 | +3.5 ± 2.1 | +2.3 | no |" in md.splitlines()


def test_paired_t_against_worked_numbers():
    # diffs 0.04, 0.05, 0.06: mean 0.05, std 0.01, t = 0.05 / (0.01 / sqrt 3) = 8.660 > 4.303 (2 df)
    t, beyond = S.paired_t([0.04, 0.05, 0.06])
    assert t == pytest.approx(8.6603, abs=1e-4) and beyond is True
    # diffs +2.3, +0.7, +2.0 points: mean 1.667, std 0.8505, t = 3.394 < 4.303: within noise at 3 seeds
    t, beyond = S.paired_t([0.023, 0.007, 0.020])
    assert t == pytest.approx(3.3941, abs=1e-3) and beyond is False
    assert S.paired_t([0.1]) == (None, None)
    assert S.paired_t([0.0, 0.0]) == (0.0, False) and S.paired_t([0.01, 0.01]) == (math.inf, True)


def test_rerun_skips_finished_cells_and_retries_failed_ones(tmp_path, monkeypatch):
    def fake_cli(title, args, log):  # only make-data reaches run_cli outside a Chain
        assert args[0] == "make-data"
        make_data(args[args.index("--out") + 1], train=8, val=4, seed=0)
        return 0.0

    calls, failed_once = [], []

    def fake_cell(chain, variant):
        calls.append((chain.task, variant, chain.seed))
        if (variant, chain.seed) == ("sft-grpo", 1) and not failed_once:
            failed_once.append(True)
            raise SystemExit("GRPO failed")  # the first time only
        return _cell(chain.task, variant, chain.seed, 0.5 + 0.1 * chain.seed, rollouts=32 * (variant == "sft-grpo"))

    monkeypatch.setattr(S, "run_cli", fake_cli)
    monkeypatch.setattr(S.Chain, "cell", fake_cell)
    rows = S.study(out=str(tmp_path), quick=True)
    assert calls == [("easy", v, s) for s in (0, 1) for v in ("sft", "sft-grpo")]
    assert not S.cell_path(tmp_path, "easy", "sft-grpo", 1).exists()
    assert [(r["variant"], r["seeds"]) for r in rows] == [("sft", 2), ("sft-grpo", 1)]

    calls.clear()
    rows = S.study(out=str(tmp_path), quick=True)
    assert calls == [("easy", "sft-grpo", 1)]  # only the failed cell runs again
    assert [(r["variant"], r["seeds"]) for r in rows] == [("sft", 2), ("sft-grpo", 2)]
    assert rows[1]["accuracy_mean"] == pytest.approx(0.55)

    calls.clear()
    S.study(out=str(tmp_path), quick=True)
    assert calls == []


def test_diff_questions_need_two_counts_and_score_like_the_others(tmp_path):
    make_data(str(tmp_path), train=60, val=0, seed=2, difficulty="medium", questions=["diff"])
    recs = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert {r["type"] for r in recs} == {"diff"}
    for r in recs:
        words = r["question"].split()  # How many more A than B shapes are there?
        a, b = words[3], words[5]
        counts = r["annotations"]["counts"]
        assert int(r["answer"]) == counts[a] - counts[b] > 0
    assert len({r["answer"] for r in recs}) > 1
    responses = [r["response"] for r in recs]
    cols = {"answer": [r["answer"] for r in recs], "annotations": [r["annotations"] for r in recs]}
    assert accuracy_reward(responses, **cols) == [1.0] * len(recs)
    assert format_reward(responses) == [1.0] * len(recs)
    assert grounding_reward(responses, **cols) == [1.0] * len(recs)
    wrong = [resp.replace("\\boxed{" + r["answer"] + "}", "\\boxed{" + str(int(r["answer"]) + 1) + "}")
             for resp, r in zip(responses, recs)]
    assert accuracy_reward(wrong, **cols) == [0.0] * len(recs)


def test_quick_study_through_the_cli(tmp_path, capsys):  # about 40 s: the study's --quick runs in make test
    """2 seeds x (SFT, SFT -> GRPO) at the quick scale, each stage a `cli.py` process; then a rerun."""
    rows = S.study(out=str(tmp_path), quick=True)
    assert [(r["task"], r["variant"], r["seeds"]) for r in rows] == [("easy", "sft", 2), ("easy", "sft-grpo", 2)]
    cells = {(v, s): json.loads(S.cell_path(tmp_path, "easy", v, s).read_text())
             for v in ("sft", "sft-grpo") for s in (0, 1)}
    sc = S.SCALES["quick"]
    for s in (0, 1):
        rl = cells[("sft-grpo", s)]
        assert rl["rollouts"] == sc.grpo_batches * sc.grpo_prompts * 8  # group_size 8
        assert [st["name"] for st in rl["stages"]] == ["sft", "sft-grpo"]
        assert all(st["cpu_seconds"] > 0 for st in rl["stages"]) and rl["cpu_seconds"] > 0
        assert rl["curve"][0] == [0, cells[("sft", s)]["accuracy"]] and rl["curve"][-1][0] == rl["rollouts"]
        assert (tmp_path / "runs" / "easy" / f"seed{s}" / "sft-grpo" / "grpo" / "checkpoints" / "last.ckpt").exists()
    import torch

    weights = [torch.load(tmp_path / "runs" / "easy" / f"seed{s}" / "sft" / "sft" / "checkpoints" / "last.ckpt",
                          map_location="cpu", weights_only=False)["state_dict"] for s in (0, 1)]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # the seed reaches SFT's init and data
    accs = [cells[("sft-grpo", s)]["accuracy"] for s in (0, 1)]
    assert rows[1]["accuracy_mean"] == pytest.approx(sum(accs) / 2)
    assert rows[1]["accuracy_std"] == pytest.approx(statistics.stdev(accs))
    with open(tmp_path / "table.csv") as f:
        assert [r["variant"] for r in csv.DictReader(f)] == ["sft", "sft-grpo"]
    stamps = {k: S.cell_path(tmp_path, "easy", *k).stat().st_mtime_ns for k in cells}

    capsys.readouterr()
    S.study(out=str(tmp_path), quick=True)
    printed = capsys.readouterr().out
    assert "$ python cli.py" not in printed and printed.count("done before, skipped") == 4
    assert stamps == {k: S.cell_path(tmp_path, "easy", *k).stat().st_mtime_ns for k in cells}


def test_grpo_variants_differ_only_in_the_buffer(tmp_path, monkeypatch):
    """The configs the GRPO variants run: the demo's callbacks, the buffer dropped (or, for
    grpo-dynamic, DynamicSampling in its place), the entropy monitor dropped; same rollouts."""
    import yaml

    seen = {}

    def fake_cli(title, args, log):  # record the command; train nothing (the stage then fails: no checkpoint)
        seen[title.rsplit(" ", 1)[-1]] = args
        return 1.0

    monkeypatch.setattr(S, "run_cli", fake_cli)
    chain = S.Chain(tmp_path, tmp_path / "data", "easy", 3, S.SCALES["small"])
    init = {"ckpt": str(tmp_path / "init.ckpt")}
    names = {}
    for variant, cbs in (("grpo", "buffer"), ("grpo-nossb", "none"), ("grpo-dynamic", "dynamic")):
        with pytest.raises(SystemExit, match="without writing"):
            chain.grpo(variant, init, "train.jsonl", cbs)
        args = seen[variant]
        cfg = yaml.safe_load(open(args[args.index("--config") + 1]))
        names[variant] = [c["class_path"].rsplit(".", 1)[-1] for c in cfg["trainer"]["callbacks"]]
        sc = S.SCALES["small"]
        assert args[args.index("--trainer.max_steps") + 1] == str(2 * sc.grpo_batches)  # 2 updates per batch
        assert args[args.index("--data.init_args.batch_size") + 1] == str(sc.grpo_prompts)
        assert args[args.index("--data.init_args.seed") + 1] == "3" and args[args.index("--model.init_args.seed") + 1] == "3"
    assert "CriticalTokenEntropy" not in names["grpo"] and "SelectiveSampleBuffer" in names["grpo"]
    assert names["grpo-nossb"] == [n for n in names["grpo"] if n != "SelectiveSampleBuffer"]
    assert names["grpo-dynamic"] == [n.replace("SelectiveSampleBuffer", "DynamicSampling") for n in names["grpo"]]


@pytest.mark.slow
def test_quick_study_runs_the_prefiltered_grpo_variants(tmp_path):
    """SFT -> MPO -> prefilter -> GRPO through cli.py: prefilter writes its kept records in the stage's
    folder, their images stay in the task's data folder (a GRPO fit that refused those paths failed
    every grpo cell of the study once); each variant ends with a checkpoint and a cell."""
    rows = S.study(out=str(tmp_path), scale="quick", tasks=["twostep"], variants=["grpo", "grpo-dynamic"], seeds=[0])
    assert [(r["task"], r["variant"], r["seeds"]) for r in rows] == [("twostep", "grpo", 1), ("twostep", "grpo-dynamic", 1)]
    for v in ("grpo", "grpo-dynamic"):
        cell = json.loads(S.cell_path(tmp_path, "twostep", v, 0).read_text())
        assert [st["name"] for st in cell["stages"]] == ["sft", "pairs", "mpo", "prefilter", v]
        assert (tmp_path / "runs" / "twostep" / "seed0" / v / "grpo" / "checkpoints" / "last.ckpt").exists()


def test_grpo_stage_reads_prefilter_output_outside_the_data_folder(tmp_path, monkeypatch):
    """The prefiltered JSONL lies in the stage folder and names images in the data folder: the GRPO
    fit must allow that (the data module refuses paths leaving the JSONL's folder by default)."""
    seen = {}

    def fake_cli(title, args, log):
        seen["args"] = args
        return 1.0

    monkeypatch.setattr(S, "run_cli", fake_cli)
    chain = S.Chain(tmp_path, tmp_path / "data", "easy", 0, S.SCALES["quick"])
    with pytest.raises(SystemExit, match="without writing"):
        chain.grpo("grpo", {"ckpt": str(tmp_path / "init.ckpt")}, str(tmp_path / "pre" / "train.prefiltered.jsonl"))
    args = seen["args"]
    assert args[args.index("--data.init_args.allow_outside_paths") + 1] == "true"


def test_grpo_log_summary_counts_dynamic_sampling_extras_in_the_curve(tmp_path):
    """4 rollout batches of 16 rollouts; DynamicSampling drew 8, 24 and 40 extra rollouts by steps 1-3;
    validations after batches 2 and 4: the curve's points sit at 2 x 16 + 8 = 40 and 4 x 16 + 40 = 104."""
    logs = tmp_path / "logs" / "version_0"
    logs.mkdir(parents=True)
    cols = ["epoch", "step", "val/accuracy", "dynamic_sampling/extra_rollouts_total",
            "dynamic_sampling/zero_std_share_after", "effective_share"]
    rows = [[0, 0, "", 0, 0.0, 0.5], [0, 1, "", 8, 0.5, 0.7], [0, 1, 0.25, "", "", ""], [0, 2, "", 24, "", ""],
            [0, 3, "", 40, "", ""], [0, 3, 0.5, "", "", ""]]
    (logs / "metrics.csv").write_text("\n".join(",".join(map(str, r)) for r in [cols, *rows]) + "\n")
    out = S.grpo_log_summary(tmp_path / "logs", batches=4, rollouts_per_batch=16)
    assert out["curve"] == [[40, 0.25], [104, 0.5]]
    assert out["rollouts"] == 104 and out["extra_rollouts"] == 40
    assert out["effective_share"] == pytest.approx(0.75)  # 1 - mean(0.0, 0.5)
    assert out["effective_share_before"] == pytest.approx(0.6)  # mean(0.5, 0.7)
    # without DynamicSampling: batches x rollouts, the buffer's share, no extras
    (logs / "metrics.csv").write_text("epoch,step,val/accuracy,ssb/effective_share_after\n0,1,0.3,1.0\n0,3,0.4,0.9\n")
    out = S.grpo_log_summary(tmp_path / "logs", batches=4, rollouts_per_batch=16)
    assert out["curve"] == [[32, 0.3], [64, 0.4]] and out["rollouts"] == 64 and out["extra_rollouts"] == 0
    assert out["effective_share"] == pytest.approx(0.95)
