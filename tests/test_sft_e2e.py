"""A few real SFT steps through the CLI: checkpoints, logs, validate, export round trip."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd):
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_sft_fit_validate_export(tiny_data, tmp_path):
    run = tmp_path / "run"
    config = tmp_path / "sft.yaml"  # the shipped config, writing under tmp_path and reading tiny_data
    config.write_text((ROOT / "configs/tiny/sft.yaml").read_text()
                      .replace("runs/sft", str(run)).replace("data/tiny/", f"{tiny_data}/"))
    common = ["--config", str(config)]
    fit = _cli("fit", *common, "--trainer.max_steps", "8", "--data.batch_size", "8", "--trainer.log_every_n_steps", "1",
               "--trainer.check_val_every_n_epoch", "1", "--model.lr", "1e-3", cwd=tmp_path)
    assert "trainable parts ['vision', 'connector', 'llm']" in fit.stdout
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    rows = list(csv.DictReader((run / "logs" / "version_0" / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses and all(l == l for l in losses)  # logged and finite
    assert any(r.get("val/accuracy") for r in rows) and any(r.get("train/tokens_per_s") for r in rows)
    assert list((run / "tensorboard").rglob("events.out.tfevents*"))

    val = _cli("validate", *common, "--ckpt_path", str(ckpt), cwd=tmp_path)
    assert "val/accuracy" in val.stdout and "val/format" in val.stdout

    out_dir = tmp_path / "hf"
    _cli("export", "--ckpt_path", str(ckpt), "--out", str(out_dir), cwd=tmp_path)
    assert json.loads((out_dir / "config.json").read_text())["model_type"] == "internvl"

    # the exported folder generates the same greedy output as the checkpoint
    from lightning_r1v2.data.collate import PromptCollator
    from lightning_r1v2.data.records import read_records
    from lightning_r1v2.jobs.export import load_module
    from lightning_r1v2.models.loading import load_policy

    module = load_module(str(ckpt))
    model, processor = load_policy(str(out_dir))
    records, _ = read_records(tiny_data / "val.jsonl")
    batch = PromptCollator(processor)(records[:4])
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              pixel_values=torch.cat([m["pixel_values"] for m in batch["media"]]), max_new_tokens=12, do_sample=False)
    assert torch.equal(module.model.generate(**kw), model.generate(**kw))
    # and the weights are the trained ones, not a fresh init
    fresh, _ = load_policy("tiny")
    assert not torch.equal(fresh.lm_head.weight, model.lm_head.weight)
