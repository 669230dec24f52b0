"""``python -m lightning_r1v2.demo --quick``: every stage through cli.py at a few steps, then the
evaluation table (slow: about 45 s on 2 cores). It once stopped at MPO: 3 SFT steps sampled fewer
preference pairs than one MPO batch, and MPO trained nothing and wrote no checkpoint."""
import json

import pytest


@pytest.mark.slow
def test_quick_demo_runs_every_stage(tmp_path):
    from lightning_r1v2 import demo

    results = demo.main(["--quick", "--out", str(tmp_path / "runs"), "--data", str(tmp_path / "data")])
    assert [r["stage"] for r in results] == ["majority answer", "SFT", "MPO", "GRPO"]
    for stage in ("sft", "mpo", "grpo"):
        assert (tmp_path / "runs" / stage / "checkpoints" / "last.ckpt").exists(), stage
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in results)
    assert json.loads((tmp_path / "runs" / "results.json").read_text()) == json.loads(json.dumps(results))
