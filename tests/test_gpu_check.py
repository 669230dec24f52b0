"""``benchmarks/gpu_check.py --device cpu --quick``: every row of the GPU check runs on a CPU, one table
comes out, and a job that fails is reported with its error's first line while the others still run."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ROWS = [
    "make-data", "sft", "build-pairs (CPU)", "mpo", "grpo (every callback)", "validate", "evaluate (CPU)", "export",
    "build tiny model folder",
    "grpo tiny CPU static cache", "grpo tiny CPU dynamic cache",
    "grpo tiny CPU ZeRO-2 static cache", "grpo tiny CPU ZeRO-2 dynamic cache",
    "grpo tiny CPU ZeRO-3 static cache", "grpo tiny CPU ZeRO-3 dynamic cache",
]
GRPO_CALLBACKS = ["RewardCallback", "SelectiveSampleBuffer", "HallucinationMonitor", "CriticalTokenEntropy",
                  "LastCheckpoint", "SaveOnInterrupt"]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_first_line_of_an_error():
    gc = _load()
    assert gc.first_line(ValueError("  \nfirst\nsecond")) == "ValueError: first"
    assert gc.first_line(KeyError()) == "KeyError"
    assert gc.first_line(SystemExit(2)).startswith("SystemExit(2): the command line was refused")


def test_quick_cpu_check_reports_every_row_and_a_failing_job(tmp_path, monkeypatch, capsys):
    gc = _load()
    import lightning_r1v2.jobs.evaluate as evaluate_job

    def broken(*args, **kwargs):
        raise ValueError("injected: evaluation broke\nnot this second line")

    monkeypatch.setattr(evaluate_job, "evaluate_module", broken)  # deep inside the real `cli.py evaluate`
    out_json = tmp_path / "check.json"
    rows = gc.main(["--device", "cpu", "--quick", "--json", str(out_json)])
    printed = capsys.readouterr().out

    assert [r["row"] for r in rows] == ROWS
    by = {r["row"]: r for r in rows}
    assert by["evaluate (CPU)"]["status"] == "fail: ValueError: injected: evaluation broke"
    for name in ROWS:
        if "ZeRO" in name:
            assert by[name]["status"] == "skip" and "refuses a CPU" in by[name]["note"], by[name]
        elif name != "evaluate (CPU)":
            assert by[name]["status"] == "pass", by[name]  # the rows after the failure ran
    assert "reloaded by path" in by["export"]["note"]
    assert " pairs sampled" in by["build-pairs (CPU)"]["note"]

    for name in ("sft", "mpo"):  # a fit without rollouts: the whole step is the update
        assert by[name]["step s"] > 0 and by[name]["update MFU %"] > 0 and by[name]["gen share %"] is None
    for name in ("grpo (every callback)", "grpo tiny CPU static cache", "grpo tiny CPU dynamic cache"):
        r = by[name]
        assert r["step s"] > 0 and 0 < r["gen share %"] < 100 and r["rollout tok/s"] > 0 and r["update MFU %"] > 0, r
    assert all(cb in by["grpo (every callback)"]["note"] for cb in GRPO_CALLBACKS), by["grpo (every callback)"]["note"]
    assert "0.8M parameters" in by["build tiny model folder"]["note"]

    # one table: the header, then one line per row, the failure with its first line only
    lines = printed.splitlines()
    head = lines.index("| " + " | ".join(gc.COLUMNS) + " |")
    body = lines[head + 2: head + 2 + len(ROWS)]
    assert [ln.split(" | ")[0].lstrip("| ") for ln in body] == ROWS
    failed = [ln for ln in body if "fail" in ln]
    assert len(failed) == 1 and "fail: ValueError: injected: evaluation broke" in failed[0]
    assert "not this second line" not in printed
    assert printed.count("| row | status |") == 1
    assert f"{len(ROWS)} rows: 10 pass, 1 fail, 4 skip" in printed

    saved = json.loads(out_json.read_text())
    assert [r["row"] for r in saved["rows"]] == ROWS and saved["versions"]["torch"]


@pytest.mark.parametrize("argv", [["--device", "cpu", "--parts", "tiny,nope"]])
def test_unknown_part_is_refused(argv, capsys):
    gc = _load()
    with pytest.raises(SystemExit):
        gc.main(argv)
    assert "--parts: unknown ['nope']" in capsys.readouterr().err


@pytest.mark.slow
def test_cpu_deepspeed_rows_run(tmp_path):
    """``--cpu-deepspeed``: the ZeRO-2/3 rows run under CPUDeepSpeedStrategy (about 45 s on 2 cores), in a
    subprocess so that DeepSpeed's process group and ``DS_ACCELERATOR`` stay out of the test session."""
    import os
    import subprocess
    import sys

    out_json = tmp_path / "ds.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu",
               MASTER_ADDR="127.0.0.1", MASTER_PORT="29547")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                          "--parts", "big", "--cpu-deepspeed", "--json", str(out_json)],
                         env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = {r["row"]: r for r in json.loads(out_json.read_text())["rows"]}
    for stage in (2, 3):
        for cache in ("static", "dynamic"):
            r = rows[f"grpo tiny CPU ZeRO-{stage} {cache} cache"]
            assert r["status"] == "pass" and r["step s"] > 0 and r["rollout tok/s"] > 0, r
            assert "0.8M params" in r["note"]  # full counts of partitioned (ZeRO-3) parameters


def test_a_row_past_its_time_limit_is_stopped_and_the_next_runs():
    gc = _load()
    check = gc.Check("cpu", budget_s=60, peak_tflops=1.0, row_timeout_s=0.3)

    def forever():
        while True:
            pass

    assert check.run("hangs", forever) is None
    assert check.run("next", lambda: {"note": "ran"}) == {"note": "ran"}
    hung, nxt = check.rows
    assert hung["status"].startswith("fail: RowTimeout: not done after 0.3 s") and 0.25 < hung["wall s"] < 5, hung
    assert nxt["status"] == "pass" and nxt["note"] == "ran"
    check.budget_s = 0  # nothing left: the next row is skipped, not started
    assert check.run("late", lambda: {"note": "ran"}) is None and check.rows[-1]["status"] == "skip"


def test_missing_modules_are_listed_by_their_pip_names(monkeypatch):
    gc = _load()
    monkeypatch.setattr(gc, "NEEDED", [("json", "json"), ("no_such_module_r1v2", "no-such-package[extra]")])
    assert gc.missing_modules() == ["no-such-package[extra]"]


def test_targets_are_read_off_the_variant_rows():
    gc = _load()
    rows = [
        {"row": "grpo 667M 1 GPU static cache", "status": "pass", "step s": 1.0, "rollout tok/s": 14532.0},
        {"row": "grpo 667M 1 GPU ZeRO-2 static cache", "status": "pass", "step s": 2.0, "rollout tok/s": 9000.0},
        {"row": "grpo 667M 1 GPU ZeRO-3 static cache", "status": "pass", "step s": 3.2, "rollout tok/s": 8000.0},
        {"row": "grpo 667M 1 GPU ZeRO-2 dynamic cache", "status": "pass", "step s": 4.0, "rollout tok/s": 2000.0},
        {"row": "grpo 667M 1 GPU ZeRO-3 dynamic cache", "status": "fail: RowTimeout: not done after 150 s"},
        {"row": "grpo tiny CPU ZeRO-2 dynamic cache", "status": "pass", "step s": 0.1, "rollout tok/s": 500.0},
        {"row": "grpo tiny CPU ZeRO-3 dynamic cache", "status": "pass", "step s": 0.3, "rollout tok/s": 400.0},
    ]
    assert gc.targets(rows) == [
        "ZeRO-3 / ZeRO-2 step time, static cache: 1.60 (target <= 1.5)",  # 3.2 / 2.0; dynamic: ZeRO-3 failed
        "best 667M rollout tok/s: 14,532 (grpo 667M 1 GPU static cache) = 6.0x the 2,422 of plain generate "
        "(target >= 5x)",  # 14532 / 2422 = 6.0
    ]  # the tiny rows (--quick) are no evidence either way: no line for them


def test_stage_cache_and_zero3_options_pick_the_rows_and_reach_the_strategy(monkeypatch):
    """``--stages 3 --caches static --zero3 JSON``: one row, named with the extra settings, whose
    strategy's ``zero_optimization`` holds them on top of stage 3's."""
    gc = _load()
    import sys
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_step

    seen = []

    def fake_variant(name, ns, cfg, train_file, device, precision, strategy, **kw):
        seen.append((name, strategy))
        return {"generate s": 1.0, "update s": 1.0, "step s": 2.0, "rollout tok/s": 10.0, "update tok": 1.0,
                "MFU %": 0.1, "_params": 1, "_trainable": 1}

    monkeypatch.setattr(gpu_step, "run_variant", fake_variant)
    extra = {"stage3_param_persistence_threshold": 1e7, "stage3_prefetch_bucket_size": 5e8}
    a = SimpleNamespace(device="cpu", quick=True, cpu_deepspeed=True, stages=[3], caches=["static"], zero3=extra,
                        group_size=2, max_new_tokens=4, prompts=2, warmup=0, steps=1, peak_tflops=1.0)
    check = gc.Check("cpu", budget_s=60, peak_tflops=1.0)
    gc.grpo_variants(check, a, Path("unused"), "unused.jsonl")
    assert [r["row"] for r in check.rows] == [
        "grpo tiny CPU ZeRO-3 static cache param_persistence_threshold=1e+07,prefetch_bucket_size=5e+08"]
    assert check.rows[0]["status"] == "pass"
    zero = seen[0][1].config["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_param_persistence_threshold"] == 1e7
    assert zero["stage3_prefetch_bucket_size"] == 5e8


@pytest.mark.parametrize("argv, says", [
    (["--device", "cpu", "--stages", "1"], "--stages takes 0, 2, 3"),
    (["--device", "cpu", "--caches", "hot"], "--caches static, dynamic"),
    (["--device", "cpu", "--zero3", "[1]"], "--zero3 takes a JSON object"),
])
def test_bad_stage_cache_or_zero3_is_refused(argv, says, capsys):
    gc = _load()
    with pytest.raises(SystemExit):
        gc.main(argv)
    assert says in capsys.readouterr().err
