"""ZeRO-3 across two ranks on a CPU, through the real command line, as the 38B configs run on GPUs.

``torchrun --nproc_per_node 2 cli.py fit --config configs/tiny/grpo.yaml --config
configs/tiny/grpo_zero3_cpu.yaml`` (``lightning_r1v2.strategies.CPUDeepSpeedStrategy``, gloo): the
parameters are partitioned between the ranks, generation gathers them, the checkpoint is a folder
with one shard per rank, ``--ckpt_path last`` resumes from it (sample buffers of both ranks
included), ``cli.py consolidate`` merges it into one file for the next stage's ``init_ckpt``, and
``cli.py export`` takes the folder directly. Slow (three 2-process runs): ``make test-all``.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REWARD = {"class_path": "lightning_r1v2.rewards.RewardCallback",
          "init_args": {"fn": "multirank_reward.length_reward", "name": "length"}}


def _run(args, cwd, port=None, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(ROOT / "cli.py"), *args]
    if port is not None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               *cmd[1:]]
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-5000:])
    return out


def _fit(tmp_path, data, max_steps, port, *extra):
    return _run([
        "fit", "--config", str(ROOT / "configs/tiny/grpo.yaml"), "--config", str(ROOT / "configs/tiny/grpo_zero3_cpu.yaml"),
        "--model.init_args.init_ckpt", "null",
        "--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        f"--trainer.callbacks+={json.dumps(REWARD)}",
        "--data.init_args.train_file", str(data / "train.jsonl"), "--data.init_args.val_file", str(data / "val.jsonl"),
        "--data.init_args.batch_size", "4", *extra,
    ], cwd=tmp_path, port=port)


def _client_state(folder: Path, rank: int) -> dict:
    return torch.load(folder / "checkpoint" / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", map_location="cpu",
                      weights_only=False)


@pytest.mark.slow
def test_zero3_two_ranks_fit_resume_consolidate_export(tiny_data, tmp_path):
    from lightning_r1v2.jobs.export import is_deepspeed_checkpoint
    from lightning_r1v2.modules import GRPOModule
    from lightning_r1v2.modules.common import PolicyModule

    ckpts = tmp_path / "runs/grpo-zero3/checkpoints"
    _fit(tmp_path, tiny_data, 4, 29631)  # 2 rollout batches x 2 updates
    last = ckpts / "last.ckpt"
    assert is_deepspeed_checkpoint(last)
    states = [_client_state(last, r) for r in (0, 1)]  # one shard per rank: the parameters were partitioned
    assert [s["global_step"] for s in states] == [4, 4] and states[0]["dp_world_size"] == 2
    buffer = states[0]["callbacks"]["SelectiveSampleBuffer"]["per_rank"]
    assert len(buffer) == 2 and [b["calls"] for b in buffer] == [2, 2]
    assert all(len(b["steps"]) > 0 for b in buffer)  # each rank buffered its own effective rows
    # the data position counts both ranks: 2 batches x 4 prompts x 2 ranks of the epoch's permutation
    assert states[0]["R1V2DataModule"]["sampler"]["consumed"] == 16

    # resume from the folder; generation now layer by layer (DeepSpeed gathers in each forward,
    # generate runs with synced_gpus): the other way HFGenerateEngine runs under ZeRO-3
    _fit(tmp_path, tiny_data, 8, 29632, "--ckpt_path", "last", "--model.init_args.engine.init_args.gather_zero3", "false")
    states = [_client_state(last, r) for r in (0, 1)]
    assert [s["global_step"] for s in states] == [8, 8]
    buffer = states[0]["callbacks"]["SelectiveSampleBuffer"]["per_rank"]
    assert [b["calls"] for b in buffer] == [4, 4]  # 2 restored + 2 new on each rank: both buffers came back
    assert states[0]["R1V2DataModule"]["sampler"]["consumed"] == 32  # continued, not restarted
    metrics = (tmp_path / "runs/grpo-zero3/logs").glob("version_*/metrics.csv")
    assert len(list(metrics)) == 2

    # one file for the next stage: every tensor, trained where trainable, untouched where frozen
    single = tmp_path / "grpo-fp32.ckpt"
    _run(["consolidate", "--ckpt_path", str(last), "--out", str(single)], cwd=tmp_path)
    ckpt = torch.load(single, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 8 and ckpt["r1v2_module_class"].endswith("GRPOModule")
    init = {f"model.{k}": v for k, v in PolicyModule(model="tiny", defer_init=False).model.state_dict().items()}
    weights = ckpt["state_dict"]
    assert set(weights) == set(init) - {"model.lm_head.weight"} or set(weights) == set(init)
    trainable = ("model.model.multi_modal_projector.", "model.model.language_model.")
    for name, value in weights.items():
        assert value.dtype == torch.float32 and value.shape == init[name].shape, name
        if name.startswith("model.model.vision_tower."):
            assert torch.equal(value, init[name]), name
    assert sum(not torch.equal(v, init[k]) for k, v in weights.items() if k.startswith(trainable)) >= 0.9 * sum(
        k.startswith(trainable) for k in weights)

    # the next stage starts from the file; a folder as init_ckpt is refused with the command to run
    nxt = GRPOModule(model="tiny", init_ckpt=str(single), defer_init=False)
    for name, value in nxt.model.state_dict().items():
        if f"model.{name}" in weights:
            assert torch.equal(value, weights[f"model.{name}"]), name
    with pytest.raises(ValueError, match="cli.py consolidate"):
        GRPOModule(model="tiny", init_ckpt=str(last), defer_init=False)

    # export takes the folder itself (consolidated on the fly): the same weights in a HF folder
    _run(["export", "--ckpt_path", str(last), "--out", str(tmp_path / "hf")], cwd=tmp_path)
    exported = PolicyModule(model=str(tmp_path / "hf"), defer_init=False).model.state_dict()
    for name, value in exported.items():
        if f"model.{name}" in weights:
            assert torch.equal(value, weights[f"model.{name}"]), name
    # the consolidated file was temporary, and nothing named last* appeared beside the folder
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("last")) == ["last.ckpt"]
    assert not [p.name for p in ckpts.iterdir() if p.name.startswith(".")]  # no staging folder left


def _fake_deepspeed_folder(path: Path) -> Path:
    (path / "checkpoint").mkdir(parents=True)
    (path / "latest").write_text("checkpoint")
    (path / "checkpoint" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"")
    return path


def test_consolidate_refuses_what_it_cannot_or_should_not_write(tmp_path):
    from lightning_r1v2.jobs.export import consolidate, is_deepspeed_checkpoint

    folder = _fake_deepspeed_folder(tmp_path / "checkpoints" / "last.ckpt")
    assert is_deepspeed_checkpoint(folder) and not is_deepspeed_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError):
        consolidate(str(tmp_path / "nope"), str(tmp_path / "a.ckpt"))
    (tmp_path / "file.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="needs no consolidation"):
        consolidate(str(tmp_path / "file.ckpt"), str(tmp_path / "a.ckpt"))
    # a last*.ckpt beside the folder would be what `--ckpt_path last` resumes from next
    with pytest.raises(ValueError, match="--ckpt_path last"):
        consolidate(str(folder), str(tmp_path / "checkpoints" / "last-fp32.ckpt"))


def test_a_folder_as_init_ckpt_names_the_command_to_run(tmp_path):
    from lightning_r1v2.modules.common import PolicyModule

    folder = _fake_deepspeed_folder(tmp_path / "last.ckpt")
    with pytest.raises(ValueError, match=f"cli.py consolidate --ckpt_path {folder}"):
        PolicyModule(model="tiny", init_ckpt=str(folder), defer_init=False)


def test_jobs_do_not_read_a_deepspeed_folder_as_a_model_folder(tmp_path, monkeypatch):
    """``evaluate``/``build-pairs`` take a DeepSpeed folder as a checkpoint (consolidated first), never
    as a Hugging Face model folder (``from_pretrained`` would fail with a confusing error)."""
    from lightning_r1v2.jobs import export, sampling

    folder = _fake_deepspeed_folder(tmp_path / "last.ckpt")
    seen = []
    monkeypatch.setattr(export, "consolidate", lambda src, out: seen.append(src) or (_ for _ in ()).throw(
        RuntimeError("consolidated")))
    with pytest.raises(RuntimeError, match="consolidated"):
        sampling.load_policy_module(str(folder))
    assert seen == [str(folder)]


@pytest.mark.slow
def test_ddp_two_ranks_resume_trains_on_the_records_of_an_unbroken_run(tiny_data, tmp_path):
    """Two ranks under DDP: a run stopped after 2 rollout batches and resumed for 2 more sees, on
    each rank, the records an unbroken 4-batch run sees, in the same order (none repeated or lost)."""
    seen = {"class_path": "multirank_reward.SeenRecords"}

    def fit(cwd, max_steps, port, *extra):
        cwd.mkdir(exist_ok=True)
        _run(["fit", "--config", str(ROOT / "configs/tiny/grpo.yaml"), "--model.init_args.init_ckpt", "null",
              "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", str(max_steps),
              "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
              f"--trainer.callbacks+={json.dumps(REWARD)}", f"--trainer.callbacks+={json.dumps(seen)}",
              "--data.init_args.train_file", str(tiny_data / "train.jsonl"), "--data.init_args.val_file", "null",
              "--data.init_args.batch_size", "4", "--model.init_args.engine.init_args.max_new_tokens", "8",
              # a constant LR: the schedule of a run stopped at step 4 is then that of an unbroken 8-step run
              "--model.init_args.warmup_ratio", "0", "--model.init_args.min_lr_ratio", "1.0", *extra],
             cwd=cwd, port=port)
        return [[(cwd / f"{kind}_rank{r}.txt").read_text().split("\n")[:-1] for r in (0, 1)]
                for kind in ("seen", "completions")]

    unbroken, unbroken_completions = fit(tmp_path / "a", 8, 29634)
    fit(tmp_path / "b", 4, 29635)
    resumed, resumed_completions = fit(tmp_path / "b", 8, 29636, "--ckpt_path", "last")
    assert [len(r) for r in unbroken] == [4, 4]
    assert resumed == unbroken
    # each rank's sampling goes on as if never stopped: its own RNG stream was saved and restored
    assert resumed_completions == unbroken_completions
    assert unbroken_completions[0] != unbroken_completions[1]
    ids = [i for rank in unbroken for batch in rank for i in batch.split()]
    assert len(ids) == len(set(ids)) == 32  # the two ranks share the permutation without overlap


@pytest.mark.slow
def test_vllm_weight_push_gathers_zero3_partitions_on_every_rank(tiny_data, tmp_path):
    """VLLMEngine.push_weights with the parameters really split between two ranks (each holds none
    of them whole): every rank hands its stand-in vLLM the full tensors, equal to the gathered
    parameters, all of them on the first push and the trainable ones after (item 3 of the scale issue)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29637", str(ROOT / "tests/ds_vllm_push.py"), str(tmp_path), str(tiny_data / "train.jsonl")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-5000:]
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["partitioned"] and r["local_elements"] == 0 < r["total_elements"]
        assert r["names_whole"] == r["full_names"] and r["names_partial"] == r["trainable"]
        assert r["counts"] == [len(r["full_names"]), len(r["trainable"])] and 0 < len(r["trainable"]) < len(r["full_names"])
        assert r["equal"] and r["resets"] == 2  # the prefix cache is reset after each push


@pytest.mark.slow
def test_sft_then_mpo_two_ranks_zero3_chained_through_consolidate(tiny_data, tmp_path):
    """The 38B flow between stages on two ranks: SFT under ZeRO-3 writes a sharded folder,
    ``cli.py consolidate`` makes it a file, MPO (reference model kept, partitioned too) starts from
    that file, and its own folder consolidates to weights that moved away from SFT's."""
    strategy = json.dumps({"class_path": "lightning_r1v2.strategies.CPUDeepSpeedStrategy", "init_args": {"config": {
        "zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 4, "zero_allow_untested_optimizer": True,
        "gradient_clipping": 1.0}}})
    common = ["--trainer.devices", "2", "--trainer.strategy", strategy, "--trainer.max_steps", "3",
              "--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--data.init_args.batch_size", "4",
              "--data.init_args.val_file", "null"]
    _run(["fit", "--config", str(ROOT / "configs/tiny/sft.yaml"), *common, "--trainer.gradient_clip_val", "null",
          "--data.init_args.train_file", str(tiny_data / "train.jsonl")], cwd=tmp_path, port=29638)
    _run(["consolidate", "--ckpt_path", "runs/sft/checkpoints/last.ckpt", "--out", "sft.ckpt"], cwd=tmp_path)

    pairs = tmp_path / "pairs.jsonl"
    with pairs.open("w") as f:
        for line in (tiny_data / "train.jsonl").read_text().splitlines()[:16]:
            rec = json.loads(line)
            f.write(json.dumps({"id": rec["id"], "question": rec["question"], "answer": rec["answer"],
                                "image": str(tiny_data / rec["image"]), "pair_id": f"{rec['id']}/0",
                                "chosen": rec["response"], "rejected": "<think> red 9 </think> \\boxed{9}"}) + "\n")
    _run(["fit", "--config", str(ROOT / "configs/tiny/mpo.yaml"), *common, "--model.init_args.init_ckpt", "sft.ckpt",
          "--model.init_args.reference", "model", "--data.init_args.train_file", str(pairs)],
         cwd=tmp_path, port=29639)
    last = tmp_path / "runs/mpo/checkpoints/last.ckpt"
    assert sorted(p.name for p in (last / "checkpoint").glob("*model_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]
    _run(["consolidate", "--ckpt_path", str(last), "--out", "mpo.ckpt"], cwd=tmp_path)
    sft = torch.load(tmp_path / "sft.ckpt", map_location="cpu", weights_only=False)
    mpo = torch.load(tmp_path / "mpo.ckpt", map_location="cpu", weights_only=False)
    assert sft["global_step"] == 3 and mpo["r1v2_module_class"].endswith("MPOModule")
    assert mpo["global_step"] == 2  # one epoch (mpo.yaml): 16 pairs split between 2 ranks, 4 per step
    policy = {k: v for k, v in mpo["state_dict"].items() if k.startswith("model.")}
    assert set(policy) == set(sft["state_dict"])  # the reference model is not saved with the policy
    moved = sum(not torch.equal(v, sft["state_dict"][k]) for k, v in policy.items())
    assert moved >= 0.9 * len(policy) and all(torch.isfinite(v).all() for v in policy.values())
