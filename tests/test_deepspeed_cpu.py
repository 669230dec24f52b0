"""DeepSpeed's accumulation semantics that GRPOModule.micro_batch_size relies on, checked on a CPU.

Lightning refuses DeepSpeed without CUDA, but DeepSpeed itself runs on its CPU accelerator
(``DS_ACCELERATOR=cpu``), so the engine can be driven directly: two ``backward`` calls then one
``step``, as GRPOModule does for two micro-batches. With ``managed_gradient_accumulation: false``
the step uses the sum of both gradients; with DeepSpeed's default (and Lightning's
``gradient_accumulation_steps`` of 1) the first micro-batch's gradient is lost. Slow (DeepSpeed
compiles a small communication op the first time): ``make test-all``.
"""
import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, os, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed

def step(managed):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, bias=False)
    w0 = model.weight.detach().clone()
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
           "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}
    if not managed:
        cfg["managed_gradient_accumulation"] = False
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=cfg)
    x = torch.arange(8.0).view(2, 4)  # two micro-batches of one row
    for i in range(2):
        engine.backward(0.5 * engine(x[i:i + 1]).sum())  # weights 1/2 each, as micro_batch_weights
    engine.step()
    return (model.weight.detach() - w0).flatten().tolist()

print("RESULT " + json.dumps({"unmanaged": step(False), "managed": step(True)}))
"""


@pytest.mark.slow
def test_unmanaged_accumulation_sums_micro_batch_gradients(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PORT="29541")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT "):])
    # d loss / d w = 0.5 * (x0 + x1) = 0.5 * [4, 6, 8, 10] = [2, 3, 4, 5]; SGD lr 0.1 -> -[0.2, 0.3, 0.4, 0.5]
    assert res["unmanaged"] == pytest.approx([-0.2, -0.3, -0.4, -0.5], abs=1e-5)
    # managed (DeepSpeed's default): only the last micro-batch, 0.5 * x1 = [2, 2.5, 3, 3.5], survives
    assert res["managed"] == pytest.approx([-0.2, -0.25, -0.3, -0.35], abs=1e-5)


def _ds_cpu_fit(args: list[str], port: int, **env) -> dict:
    """Run tests/ds_cpu_fit.py with ``args``; its RESULT line as a dict."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), **env)
    script = os.path.join(os.path.dirname(__file__), "ds_cpu_fit.py")
    out = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def _fit(stage: int, micro: int, ckpt: str, port: int, data) -> dict:
    return _ds_cpu_fit([str(stage), str(micro), ckpt], port, TRAIN_FILE=str(data / "train.jsonl"))


@pytest.mark.slow
def test_grpo_module_runs_unchanged_under_zero2_and_zero3(tiny_data):
    """Item 2 of the scale issue, on DeepSpeed's CPU accelerator: two rollout batches each."""
    z2 = _fit(2, 16, "none", 29542, tiny_data)  # ZeRO-2, 32 rows accumulated in micro-batches of 16
    z3 = _fit(3, 0, "none", 29543, tiny_data)  # ZeRO-3: generate gathers the partitioned parameters
    assert z3["partitioned"] and not z2["partitioned"]
    # ZeRO-3 generation ran gathered once with DeepSpeed's hooks removed (and training went on after:
    # the hooks came back), every rollout batch
    assert z3["unhooked"] == [True, True] and z2["unhooked"] == [False, False]
    for r in (z2, z3):
        assert r["global_step"] == 4  # 2 rollout batches x 2 passes (configs/tiny/grpo.yaml)
        assert r["changed"] == r["trainable"] > 0 and r["frozen_unchanged"] and r["finite"]
        assert len(r["completions"]) == 32 and r["reward"] > 0
    # generation under ZeRO-3 (gathered) samples what ZeRO-2 samples from the same weights and seed
    assert z3["completions"] == z2["completions"]


@pytest.mark.slow
def test_lora_grpo_under_zero3(tiny_data):
    """LoRA adapters under ZeRO-3 (configs/tiny/grpo_lora.yaml's settings): the adapters, all 2-D, once made
    an empty no-decay group that ZeRO-3 dropped, and the LR schedule crashed at its first step."""
    r = _ds_cpu_fit(["3", "0", "none"], 29548, TRAIN_FILE=str(tiny_data / "train.jsonl"), LORA="1")
    assert r["partitioned"] and r["global_step"] == 4 and r["finite"]
    # every adapter tensor trained, every base tensor bit-identical
    assert r["changed"] == r["trainable"] > 0 and r["frozen_unchanged"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_mpo_module_runs_unchanged_under_deepspeed(stage, tmp_path):
    r = _ds_cpu_fit(["mpo", str(stage), str(tmp_path)], 29544 + stage)
    assert r["global_step"] == 2 and r["partitioned"] == (stage == 3)
    assert r["changed"] == r["params"] > 0  # every policy tensor trained (the reference model is separate)
    assert r["loss"] == r["loss"] and abs(r["loss"]) < 1e4  # finite
