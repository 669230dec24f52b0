"""A few real SFT steps through the CLI: checkpoints, logs, validate, export round trip."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_r1v2.rewards import accuracy_reward, format_reward

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
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)  # one per step, no NaN nor inf
    assert losses[-1] < losses[0] - 0.5, losses  # it learns: the loss of a random-init model falls fast
    val_rows = [r for r in rows if r.get("val/accuracy")]
    assert len(val_rows) == 1 and any(r.get("train/tokens_per_s") for r in rows)
    logged_accuracy, logged_format = float(val_rows[0]["val/accuracy"]), float(val_rows[0]["val/format"])
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
    # val/accuracy and val/format are the shares of the 16 held-out records whose greedy answer
    # (24 new tokens, the config's eval_max_new_tokens; one batch) is right / well formed
    batch = PromptCollator(processor)(records)
    out = module.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                pixel_values=torch.cat([m["pixel_values"] for m in batch["media"]]), max_new_tokens=24,
                                do_sample=False)
    texts = [t.split(processor.tokenizer.eos_token)[0].replace(processor.tokenizer.pad_token, "")
             for t in processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:])]
    acc = accuracy_reward(texts, answer=[r["answer"] for r in records], choices=[r.get("choices") for r in records])
    assert len(records) == 16
    assert logged_accuracy == pytest.approx(sum(acc) / 16, abs=1e-6)
    assert logged_format == pytest.approx(sum(format_reward(texts)) / 16, abs=1e-6)
    # and the weights are the trained ones, not a fresh init
    fresh, _ = load_policy("tiny")
    assert not torch.equal(fresh.lm_head.weight, model.lm_head.weight)
