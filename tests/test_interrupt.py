"""Ctrl-C during GRPO: a checkpoint is saved, the process exits with a message, and the run resumes.

The runs are the real CLI on ``configs/tiny/grpo.yaml`` (which lists ``SaveOnInterrupt``), shrunk
by the helpers of ``test_resume.py``; SIGINT is what a terminal sends on Ctrl-C.
"""
from __future__ import annotations

import signal
import time

import pytest
import yaml

from test_resume import (DONE, ROOT, Run, batches_in, compare_final_checkpoints, grpo_cfg, load, read_steps,
                         stage_config)


@pytest.fixture(scope="module")
def data16(tmp_path_factory):
    from lightning_r1v2.data.synthetic import make_data

    out = tmp_path_factory.mktemp("interrupt_data")
    make_data(str(out), train=16, val=2, seed=7, difficulty="easy")
    return out


def _config(data16, run, record, batches, **kw):
    return stage_config("grpo", run, batches=batches, record=record, **grpo_cfg(data16), **kw)


def test_callback_is_in_every_tiny_config():
    for stage in ("sft", "mpo", "grpo"):
        cfg = yaml.safe_load((ROOT / "configs" / "tiny" / f"{stage}.yaml").read_text())
        assert any(cb["class_path"].endswith("SaveOnInterrupt") for cb in cfg["trainer"]["callbacks"]), stage


def test_ctrl_c_saves_at_the_step_boundary_exits_130_and_resumes(data16, tmp_path):
    run, record = tmp_path / "run", tmp_path / "steps.jsonl"
    proc = Run(_config(data16, run, record, batches=8, announce=True), cwd=tmp_path)
    proc.wait_for(f"{DONE} 1")
    proc.proc.send_signal(signal.SIGINT)
    proc.wait(expect=130)
    path = run / "ckpt" / "interrupted.ckpt"
    out = proc.output
    assert "Ctrl-C: finishing this step" in out and f"Resume: run the same command with --ckpt_path {path}" in out
    saved = load(path)  # loads as Lightning loads it (weights_only)
    k = batches_in(saved)
    assert 1 <= k < 8 and f"Interrupted: saved step {saved['global_step']} to {path}" in out
    assert "r1v2_interrupted_mid_step" not in saved
    assert sorted(read_steps(record)) == list(range(1, k + 1))  # nothing ran after the saved batch

    resumed = Run(_config(data16, run, record, batches=k + 1), "--ckpt_path", str(path), cwd=tmp_path).wait()
    assert f"Restoring states from the checkpoint path at {path}" in resumed.output
    steps = read_steps(record)
    assert sorted(steps) == list(range(1, k + 2))
    ids = [i for s in sorted(steps) for i in steps[s]["ids"]]
    assert len(ids) == len(set(ids))  # the resumed batch has new prompts: none repeated, none skipped


@pytest.mark.slow
@pytest.mark.parametrize("records", [16, 4], ids=["mid-epoch", "epoch-boundary"])
def test_ctrl_c_resume_equals_a_run_never_stopped(data16, tmp_path, records):
    # Ctrl-C at the end of batch 2 (the process signals itself, so the batch is known): with 4
    # records and 2 per batch that is the last batch of epoch 0
    def config(run, record, **kw):
        cfg = grpo_cfg(data16, max_train_records=records)
        return stage_config("grpo", run, batches=4, record=record, **cfg, **kw)

    straight = Run(config(tmp_path / "straight", tmp_path / "a.jsonl"), cwd=tmp_path)
    run, record = tmp_path / "run", tmp_path / "b.jsonl"
    Run(config(run, record, sigint_after=2), cwd=tmp_path).wait(expect=130)
    path = run / "ckpt" / "interrupted.ckpt"
    assert batches_in(load(path)) == 2
    Run(config(run, record), "--ckpt_path", str(path), cwd=tmp_path).wait()
    straight.wait()
    # weights, optimizer, scheduler, buffer, RNG, sampler and the loops' progress counters
    compare_final_checkpoints(tmp_path / "straight" / "ckpt" / "last.ckpt", run / "ckpt" / "last.ckpt")
    a, b = read_steps(tmp_path / "a.jsonl"), read_steps(record)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert (a[s]["ids"], a[s]["rng"], a[s]["epoch"]) == (b[s]["ids"], b[s]["rng"], b[s]["epoch"]), s


@pytest.mark.slow
def test_second_ctrl_c_stops_mid_step_and_still_resumes(data16, tmp_path):
    run, record = tmp_path / "run", tmp_path / "steps.jsonl"
    proc = Run(_config(data16, run, record, batches=8, announce=True), cwd=tmp_path)
    proc.wait_for(f"{DONE} 1")
    proc.proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.proc.send_signal(signal.SIGINT)
    proc.wait(expect=(1, 130))
    path = run / "ckpt" / "interrupted.ckpt"
    out = proc.output
    saved = load(path)
    k = batches_in(saved)
    if saved.get("r1v2_interrupted_mid_step"):
        assert proc.rc == 1  # Lightning's own exit status after KeyboardInterrupt
        assert f"Interrupted mid-step: saved the state at step {saved['global_step']} to {path}" in out
    else:  # the second signal came after the batch had finished: a step-boundary save, then a clean exit
        assert proc.rc == 130 and "the checkpoint is saved, finishing the shutdown" in out
        assert f"Interrupted: saved step {saved['global_step']} to {path}" in out
    resumed = Run(_config(data16, run, record, batches=k + 2), "--ckpt_path", str(path), cwd=tmp_path).wait()
    assert f"Restoring states from the checkpoint path at {path}" in resumed.output
    steps = read_steps(record)  # one line per batch; a redone batch's later line wins
    assert sorted(steps) == list(range(1, k + 3))
    ids = [i for s in sorted(steps) for i in steps[s]["ids"]]
    assert len(ids) == len(set(ids))  # no prompt twice, none skipped (16 prompts, 2 per batch)
    assert batches_in(load(run / "ckpt" / "last.ckpt")) == k + 2
