"""``benchmarks/gpu_step.py --device cpu``: the smoke test of the GPU benchmark (variant a in fp32, b skipped)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["variant", "precision", "step s", "generate s", "update s", "peak mem GB", "rollout tok/s",
           "update tok", "update TFLOP/s", "MFU %"]


def test_gpu_step_cpu_smoke_prints_the_table():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_step.py"), "--device", "cpu", "--steps", "1", "--warmup", "1",
         "--prompts", "2", "--group-size", "2", "--max-new-tokens", "4", "--peak-tflops", "100"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| variant |"))
    assert [c.strip() for c in lines[header].strip("|").split("|")] == COLUMNS
    row = [c.strip() for c in lines[header + 2].strip("|").split("|")]
    values = dict(zip(COLUMNS, row))
    assert values["variant"] == "a: CPU" and values["precision"] == "32-true"
    numbers = {k: float(v) for k, v in values.items() if k not in ("variant", "precision")}
    assert all(v > 0 for v in numbers.values()), numbers
    # the columns agree with each other: MFU is the update's FLOP rate over --peak-tflops
    assert abs(numbers["MFU %"] - 100 * numbers["update TFLOP/s"] / 100) <= 0.01 * numbers["MFU %"]
    assert numbers["generate s"] + numbers["update s"] <= numbers["step s"] * 1.001
    assert "variant b (deepspeed_stage_2) skipped" in out.stdout and "CUDA" in out.stdout
    assert "MFU = (2 x N + 4 x N_trainable) x T_update" in out.stdout and "peak = 100 TFLOP/s" in out.stdout
