"""Kill -9 and resume: a run resumed with ``--ckpt_path last`` equals a run that was never stopped.

Each test starts the real CLI (``python cli.py fit --config <the tiny YAML, shrunk>``) twice:
once straight through, once paused after batch k and killed with SIGKILL, then resumed with
``--ckpt_path last``. A recording callback (below; the subprocess imports this file) writes the
prompt ids, an RNG digest and a weight sum after every training batch. The two final
checkpoints must agree on everything that makes a run: weights (atol 1e-6), optimizer and
scheduler state, callback state (the Selective Sample Buffer's rows and generator, reward
counters, monitors), the RNG streams, the sampler's position, the loops' progress counters and
the MPO running delta; and the batches must hold the same prompts in the same order, none twice,
none skipped.

Steps are counted in training batches: a GRPO batch may make several optimizer steps
(``updates_per_batch``), and ``trainer.max_steps`` counts those.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
PAUSED = "R1V2-TEST paused after batch"
DONE = "R1V2-TEST finished batch"


# ------------------------------------------------------------------ imported by the subprocess
def length_reward(completions, **_):
    """0, 1 or 2 by completion length: varies on an untrained policy, so advantages are non-zero
    and the Selective Sample Buffer fills (the real rewards are all 0 on a random model)."""
    return [float(len(c) % 3) for c in completions]


def batches_done(trainer) -> int:
    return trainer.fit_loop.epoch_loop.batch_progress.total.processed


class StepRecorder(Callback):
    """One JSON line per finished training batch (its number, the ids trained on, an RNG digest,
    a weight sum). ``pause_after=k``: prints a marker at the start of batch k+1 (after batch k's
    checkpoint was written) and sleeps until killed. ``announce``: prints ``<DONE> k`` after each
    batch. ``sigint_after=k``: sends itself SIGINT (Ctrl-C) at the end of batch k. It draws no
    random numbers."""

    def __init__(self, path: str, pause_after: int = -1, announce: bool = False, sigint_after: int = -1):
        self.path, self.pause_after, self.announce, self.sigint_after = path, pause_after, announce, sigint_after

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batches_done(trainer) == self.pause_after:
            print(f"{PAUSED} {self.pause_after}", flush=True)
            time.sleep(600)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        k = batches_done(trainer)
        ids = batch.get("pair_ids") or [r["id"] for r in batch["records"]]
        with torch.no_grad():
            wsum = float(sum(p.double().sum() for p in pl_module.parameters()))
        row = {"batch": k, "step": trainer.global_step, "epoch": trainer.current_epoch,
               "ids": [str(i) for i in ids], "rng": rng_digest(), "wsum": wsum}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.announce:
            print(f"{DONE} {k}", flush=True)
        if k == self.sigint_after:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C at a known batch


class KillDuringSave(Callback):
    """Makes the ``at``-th ``torch.save`` of the process write half its bytes, then SIGKILLs the
    process: a power cut in the middle of a checkpoint write."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def setup(self, trainer, pl_module, stage):
        import io

        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            self.calls += 1
            if self.calls != self.at or isinstance(f, (str, os.PathLike)):
                return real_save(obj, f, *args, **kwargs)
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            print(f"R1V2-TEST killed while writing {getattr(f, 'name', f)}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = save


def rng_digest() -> str:
    import random

    import numpy as np

    h = hashlib.sha1(torch.get_rng_state().numpy().tobytes())
    h.update(repr(random.getstate()).encode())
    h.update(np.random.get_state()[1].tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------- harness
def stage_config(stage: str, run: Path, *, batches: int, data: dict, model: dict, record: Path,
                 callbacks: list[dict] = (), callback_args: dict | None = None, trainer: dict | None = None,
                 pause_after: int = -1, announce: bool = False, sigint_after: int = -1) -> Path:
    """``configs/tiny/<stage>.yaml`` shrunk for a test; the plugins and callbacks it ships are kept.

    ``batches``: training batches to run (``max_steps`` is set from the model's updates per batch);
    ``callbacks``: added when the YAML has none of that class (and name); ``callback_args``:
    class name -> init_args overrides for callbacks of the YAML (test sizes, test files).
    """
    cfg = yaml.safe_load((ROOT / "configs" / "tiny" / f"{stage}.yaml").read_text())
    t = cfg["trainer"]
    assert any("AtomicCheckpointIO" in p["class_path"] for p in t.get("plugins") or []), "config lost its plugin"
    cfg["model"]["init_args"].update(init_ckpt=None, **model)
    updates = int(cfg["model"]["init_args"].get("updates_per_batch", 1))
    t.update(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(run),
             num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1, val_check_interval=None,
             max_steps=batches * updates, max_epochs=None, **(trainer or {}))
    present = {_callback_key(cb) for cb in t["callbacks"]}
    t["callbacks"] += [cb for cb in callbacks if _callback_key(cb) not in present]
    for cb in t["callbacks"]:
        name = cb["class_path"].rsplit(".", 1)[-1]
        cb["init_args"] = dict(cb.get("init_args") or {}, **(callback_args or {}).get(name, {}))
        if name in ("ModelCheckpoint", "LastCheckpoint"):  # a checkpoint after every batch, all kept
            cb["init_args"].update(dirpath=str(run / "ckpt"), every_n_train_steps=1, save_top_k=-1)
    t["callbacks"].append({"class_path": "test_resume.StepRecorder", "init_args": {
        "path": str(record), "pause_after": pause_after, "announce": announce, "sigint_after": sigint_after}})
    cfg["data"]["init_args"].update(val_file=None, **data)
    path = run.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def _callback_key(cb: dict) -> tuple:
    return cb["class_path"].rsplit(".", 1)[-1], (cb.get("init_args") or {}).get("name")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), env.get("PYTHONPATH", "")])
    return env


class Run:
    """``cli.py fit`` in a subprocess; stdout and stderr are read into ``lines`` by a thread."""

    def __init__(self, config: Path, *args: str, cwd: Path):
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(config), *args],
            cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 300) -> None:
        """Block until a line starting with ``text`` was printed (fail if the process ends first)."""
        end = time.monotonic() + timeout
        while not any(line.startswith(text) for line in list(self.lines)):
            if self.proc.poll() is not None or time.monotonic() > end:
                time.sleep(0.2)  # let the reader drain
                if any(line.startswith(text) for line in list(self.lines)):
                    return
                self.proc.kill()
                pytest.fail(f"never printed {text!r} (rc={self.proc.poll()}):\n{self.output[-4000:]}")
            time.sleep(0.01)

    def kill_when_paused(self, k: int) -> None:
        self.wait_for(f"{PAUSED} {k}")
        self.proc.send_signal(signal.SIGKILL)
        self.wait(30, expect=-signal.SIGKILL)

    def wait(self, timeout: float = 300, expect: int | tuple = 0) -> "Run":
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"timed out:\n{self.output[-4000:]}")
        self._reader.join(10)
        self.rc = rc
        ok = rc in expect if isinstance(expect, tuple) else rc == expect
        assert ok, f"exit {rc} (expected {expect}):\n{self.output[-4000:]}"
        return self


def read_steps(path: Path) -> dict[int, dict]:
    """Batch number -> its record (a redone batch's later line wins)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["batch"]: r for r in rows}


def load(path: Path) -> dict:
    # what Lightning itself does on --ckpt_path with torch >= 2.6: weights_only=True
    return torch.load(path, map_location="cpu", weights_only=True)


def batches_in(ckpt: dict) -> int:
    return ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"]


def assert_same(a, b, where: str = "checkpoint", atol: float = 1e-6):
    """Nested equality; floating tensors and floats within ``atol``."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}", atol)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]", atol)
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, f"{where}: tensors differ"
        if a.is_floating_point():
            torch.testing.assert_close(a, b, atol=atol, rtol=0, equal_nan=True, msg=lambda m: f"{where}: {m}")
        else:
            assert torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, float) and isinstance(b, float):
        assert a == b or abs(a - b) <= atol or (a != a and b != b), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def compare_final_checkpoints(straight: Path, resumed: Path) -> tuple[dict, dict]:
    a, b = load(straight), load(resumed)
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    assert_same(a["state_dict"], b["state_dict"], "weights")
    assert_same(a["optimizer_states"], b["optimizer_states"], "optimizer")
    assert_same(a["lr_schedulers"], b["lr_schedulers"], "lr_schedulers")
    assert_same(a["r1v2_rng_state"], b["r1v2_rng_state"], "rng", atol=0)
    for key in a:
        if key.endswith("DataModule"):
            assert_same(a[key], b[key], key, atol=0)  # sampler epoch and position
    cbs = {k: v for k, v in a["callbacks"].items() if not k.startswith(("ModelCheckpoint", "LastCheckpoint"))}  # paths differ
    assert_same(cbs, {k: v for k, v in b["callbacks"].items() if not k.startswith(("ModelCheckpoint", "LastCheckpoint"))}, "callbacks")
    for key in ("mpo_delta", "mpo_ref_logps"):
        assert (key in a) == (key in b)
        if key in a:
            assert_same(a[key], b[key], key)
    assert_same(a["loops"], b["loops"], "loops", atol=0)  # progress counters: logging step, val schedule
    return a, b


def kill_and_resume(stage: str, tmp_path: Path, *, kill_after: int, batches: int, **cfg) -> dict:
    """Run straight and killed-then-resumed (the first two concurrently); compare. Returns facts."""
    straight_run, broken_run = tmp_path / "straight", tmp_path / "broken"
    rec_a, rec_b = tmp_path / "straight.jsonl", tmp_path / "broken.jsonl"
    cfg_a = stage_config(stage, straight_run, batches=batches, record=rec_a, **cfg)
    cfg_b = stage_config(stage, broken_run, batches=batches, record=rec_b, pause_after=kill_after, **cfg)
    straight = Run(cfg_a, cwd=tmp_path)
    broken = Run(cfg_b, cwd=tmp_path)
    broken.kill_when_paused(kill_after)
    last = broken_run / "ckpt" / "last.ckpt"
    assert batches_in(load(last)) == kill_after
    assert sorted(read_steps(rec_b)) == list(range(1, kill_after + 1))  # killed before batch k+1 ran

    # resume: the same config without the pause, `--ckpt_path last` resolved by Lightning
    cfg_c = stage_config(stage, broken_run, batches=batches, record=rec_b, **cfg)
    resumed = Run(cfg_c, "--ckpt_path", "last", cwd=tmp_path)
    resumed.wait()
    straight.wait()
    assert f"Restoring states from the checkpoint path at {last}" in resumed.output, resumed.output[-3000:]
    assert "dataloader is not resumable" not in resumed.output

    a, b = compare_final_checkpoints(straight_run / "ckpt" / "last.ckpt", last)
    assert batches_in(a) == batches

    # the same prompts in the same order, the same RNG stream and weights after every batch
    steps_a, steps_b = read_steps(rec_a), read_steps(rec_b)
    assert sorted(steps_a) == sorted(steps_b) == list(range(1, batches + 1))
    for s in steps_a:
        assert steps_a[s]["ids"] == steps_b[s]["ids"], f"batch {s}: trained on other prompts"
        assert steps_a[s]["rng"] == steps_b[s]["rng"], f"batch {s}: RNG streams differ"
        assert steps_a[s]["wsum"] == pytest.approx(steps_b[s]["wsum"], abs=1e-6), f"batch {s}: weights differ"
    return {"straight": a, "steps": steps_a}


# --------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def data16(tmp_path_factory):
    from lightning_r1v2.data.synthetic import make_data

    out = tmp_path_factory.mktemp("resume_data")
    make_data(str(out), train=16, val=2, seed=7, difficulty="easy")
    return out


def grpo_cfg(data16, clear_every_epoch=False, **data) -> dict:
    """Test sizes for configs/tiny/grpo.yaml: 2 prompts x 2 samples of 8 tokens per batch."""
    buffer = {"capacity": 16, "max_age": 8, "clear_every_epoch": clear_every_epoch}
    return {
        "model": {"group_size": 2, "table_every_n_steps": 0, "engine": {
            "class_path": "lightning_r1v2.rollout.HFGenerateEngine", "init_args": {"max_new_tokens": 8}}},
        "data": {"train_file": str(data16 / "train.jsonl"), "batch_size": 2, **data},
        "callbacks": [
            {"class_path": "lightning_r1v2.rewards.RewardCallback",
             "init_args": {"fn": "test_resume.length_reward", "name": "length", "weight": 1.0}},
            {"class_path": "lightning_r1v2.callbacks.SelectiveSampleBuffer", "init_args": buffer},
        ],
        "callback_args": {
            "SelectiveSampleBuffer": buffer,
            "CriticalTokenEntropy": {"data_file": str(data16 / "val.jsonl"), "num_prompts": 2, "every_n_steps": 2,
                                     "max_new_tokens": 8},
        },
    }


def _ssb_state(ckpt: dict) -> dict:
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("SelectiveSampleBuffer"))
    return state["per_rank"][0]  # one rank here


def test_grpo_kill_mid_epoch_and_resume_equals_a_run_never_stopped(data16, tmp_path):
    # 16 prompts, 2 per batch: 8 batches an epoch; killed after batch 2 of 4
    facts = kill_and_resume("grpo", tmp_path, kill_after=2, batches=4, **grpo_cfg(data16))
    ids = [i for s in sorted(facts["steps"]) for i in facts["steps"][s]["ids"]]
    assert len(ids) == len(set(ids)) == 8  # one epoch: no prompt twice
    buffer = _ssb_state(facts["straight"])
    assert buffer["store"] is not None and len(buffer["steps"]) > 0  # the compared buffer is not empty


@pytest.mark.slow
def test_grpo_kill_at_an_epoch_boundary_and_resume(data16, tmp_path):
    # 4 prompts, 2 per batch: killed after batch 2, the last of epoch 0; epoch 1 must reshuffle,
    # and the epoch-end hooks must run (the buffer empties at each epoch end here)
    cfg = grpo_cfg(data16, clear_every_epoch=True, max_train_records=4)
    facts = kill_and_resume("grpo", tmp_path, kill_after=2, batches=4, **cfg)
    steps = facts["steps"]
    assert [steps[s]["epoch"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    first, second = steps[1]["ids"] + steps[2]["ids"], steps[3]["ids"] + steps[4]["ids"]
    assert sorted(first) == sorted(second) and len(set(first)) == 4  # each epoch sees every prompt once


@pytest.fixture(scope="module")
def pairs16(data16):
    from lightning_r1v2.data.records import read_records

    records, _ = read_records(data16 / "train.jsonl")
    path = data16 / "pairs.jsonl"
    with path.open("w") as f:
        for i, rec in enumerate(records):
            row = {k: rec[k] for k in ("id", "question", "answer")}
            row.update(image=rec["image_rel"], pair_id=f"{rec['id']}/0", chosen=rec["response"],
                       rejected="<think> red " + "9 " * (i % 3) + "</think> \\boxed{9}")
            f.write(json.dumps(row) + "\n")
    return path


@pytest.mark.slow
def test_mpo_kill_and_resume_keeps_the_running_delta(pairs16, tmp_path):
    cfg = {"data": {"train_file": str(pairs16), "batch_size": 2}, "model": {}}
    facts = kill_and_resume("mpo", tmp_path, kill_after=2, batches=4, **cfg)
    a = facts["straight"]
    assert a["mpo_delta"] and len(a["mpo_ref_logps"]) == 16  # compared above, and not trivially empty


# ---------------------------------------------------------------------------- atomic checkpoints
def test_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(data16, tmp_path):
    # saves per batch: epoch=0-step=k.ckpt, then last.ckpt; the 4th save is batch 2's last.ckpt
    run = tmp_path / "run"
    cfg = dict(batches=3, record=tmp_path / "steps.jsonl", model={},
               data={"train_file": str(data16 / "train.jsonl"), "batch_size": 2})
    killing = stage_config("sft", run, **cfg, callbacks=[{"class_path": "test_resume.KillDuringSave",
                                                          "init_args": {"at": 4}}])
    killed = Run(killing, cwd=tmp_path).wait(expect=-signal.SIGKILL)
    ckpt_dir = run / "ckpt"
    partial = [p for p in ckpt_dir.iterdir() if p.name.startswith(".last.ckpt.") and p.name.endswith(".partial")]
    assert len(partial) == 1 and f"killed while writing {partial[0]}" in killed.output, killed.output[-2000:]
    with pytest.raises(Exception):
        load(partial[0])  # it really is half a checkpoint
    steps = {p.name: load(p)["global_step"] for p in ckpt_dir.glob("*.ckpt")}  # every *.ckpt loads
    assert steps == {"epoch=0-step=1.ckpt": 1, "epoch=0-step=2.ckpt": 2, "last.ckpt": 1}

    # `--ckpt_path last` resolves to the intact last.ckpt, not the partial file; the next save
    # removes the dead process's partial file
    resumed = Run(stage_config("sft", run, **cfg), "--ckpt_path", "last", cwd=tmp_path).wait()
    assert f"Restoring states from the checkpoint path at {ckpt_dir / 'last.ckpt'}" in resumed.output
    assert load(ckpt_dir / "last.ckpt")["global_step"] == 3
    assert not list(ckpt_dir.glob(".*.partial"))
    assert [r["batch"] for r in map(json.loads, (tmp_path / "steps.jsonl").read_text().splitlines())] == [1, 2, 2, 3]


def test_atomic_io_keeps_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    from lightning_r1v2.utils import checkpoint as ck

    io = ck.AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert load(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the partial file is gone


def test_stale_partial_files_of_dead_processes_are_removed(tmp_path):
    from lightning_r1v2.utils.checkpoint import partial_path, remove_stale_partials

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = partial_path(tmp_path / "last.ckpt", pid=int(dead.stdout))
    mine = partial_path(tmp_path / "epoch=0-step=2.ckpt")
    for p in (stale, mine):
        p.write_bytes(b"x")
    assert not stale.name.endswith(".ckpt") and not stale.name.startswith("last")  # never taken for a checkpoint
    assert remove_stale_partials(tmp_path) == [stale]
    assert mine.exists() and not stale.exists()


def test_partial_files_of_live_processes_are_kept(tmp_path):
    """Another process still writing its checkpoint keeps its partial file; a dead one's goes."""
    from lightning_r1v2.utils.checkpoint import partial_path, remove_stale_partials

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        other = partial_path(tmp_path / "last.ckpt", pid=live.pid)
        other.write_bytes(b"x")
        assert remove_stale_partials(tmp_path) == [] and other.exists()
    finally:
        live.kill()
        live.wait()
    assert remove_stale_partials(tmp_path) == [other] and not other.exists()
