"""Training from every record source through ``cli.py fit``, and multi-image and text-only records
through SFT, MPO, GRPO (rollouts, the Selective Sample Buffer, rewards, monitors) and evaluation,
on the tiny default model and a real family (tiny random qwen2_vl, ``tiny_families.py``).

The mixed data set is written the way geometry3k is published: parquet, ``images`` a list of
``{bytes, path}`` (0, 1 or 2 per row: text-only, one and two images), ``problem`` with one
``<image>`` mark per image, ``answer``; plus ``solution`` (the SFT target), named in ``columns``.
"""
from __future__ import annotations

import csv
import io
import json
import random
import re
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
GEO = {"question_key": "problem", "image_key": "images", "response_key": "solution"}
FILES = {"jsonl": "{split}.jsonl", "llava": "{split}.json", "parquet": "{split}.parquet", "hf": "{split}"}


def _main(*args):
    sys.path.insert(0, str(ROOT))
    from cli import main

    return main(list(args))


def _png(path: Path) -> bytes:
    buf = io.BytesIO()
    with Image.open(path) as im:
        im.save(buf, format="PNG")
    return buf.getvalue()


def mixed_rows(data: Path, split: str, seed: int) -> list[dict]:
    """Rows of three kinds from the synthetic records of ``data/{split}.jsonl``, in turn: one image,
    two images (colour counts summed over both), text only (sums of two numbers)."""
    from lightning_r1v2.data.synthetic import reference_response

    recs = [json.loads(line) for line in (data / f"{split}.jsonl").read_text().splitlines()]
    rng = random.Random(seed)
    rows = []
    for i in range(0, len(recs) - 1, 2):
        a, b = recs[i], recs[i + 1]
        kind = (i // 2) % 3
        if kind == 0:
            rows.append({"id": a["id"], "images": [{"bytes": _png(data / a["image"]), "path": a["image"]}],
                         "problem": "<image>" + a["question"], "answer": a["answer"], "solution": a["response"],
                         "annotations": a["annotations"]})
        elif kind == 1:
            counts = {c: a["annotations"]["counts"][c] + b["annotations"]["counts"][c] for c in a["annotations"]["counts"]}
            colour = rng.choice(sorted(counts))
            rows.append({"id": f"{a['id']}+{b['id']}",
                         "images": [{"bytes": _png(data / r["image"]), "path": r["image"]} for r in (a, b)],
                         "problem": f"<image><image>How many {colour} shapes are there in the two images?",
                         "answer": str(counts[colour]), "solution": reference_response(counts, str(counts[colour])),
                         "annotations": {"counts": counts}})
        else:
            x, y = rng.randint(1, 9), rng.randint(1, 9)
            rows.append({"id": f"sum-{i}", "images": [], "problem": f"What is {x} + {y}?", "answer": str(x + y),
                         "solution": f"<think> {x} plus {y} </think> \\boxed{{{x + y}}}", "annotations": None})
    return rows


def write_mixed(out: Path, seed: int = 3) -> Path:
    """``train.parquet`` (12 rows) and ``val.parquet`` (6), geometry3k's columns; ``val.jsonl`` beside
    them (the same records) for the entropy callback of the GRPO config, which reads JSONL."""
    import datasets

    from lightning_r1v2.data.synthetic import make_data

    make_data(str(out / "src"), train=24, val=12, seed=seed)
    for split in ("train", "val"):
        rows = mixed_rows(out / "src", split, seed)
        ds = datasets.Dataset.from_list(rows).cast_column("images", datasets.List(datasets.Image()))
        ds.to_parquet(str(out / f"{split}.parquet"))
    with (out / "val.jsonl").open("w") as f:
        for r in mixed_rows(out / "src", "val", seed):
            images = [f"src/{im['path']}" for im in r["images"]]
            rec = {"id": r["id"], "question": r["problem"].replace("<image>", ""), "answer": r["answer"],
                   "response": r["solution"], "annotations": r["annotations"]}
            f.write(json.dumps({**rec, **({"image": images} if images else {})}) + "\n")
    return out


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return write_mixed(tmp_path_factory.mktemp("mixed"))


def _config(stage: str, run: Path, data: Path) -> str:
    """The shipped config of ``stage``, writing under ``run``, its data paths in ``data``."""
    text = re.sub(r"runs/\w+", str(run), (ROOT / f"configs/tiny/{stage}.yaml").read_text())
    path = Path(str(run) + f"-{stage}.yaml")
    path.write_text(text.replace("data/tiny/", f"{data}/"))
    return str(path)


def _common(model: str, run: Path, train: str, val: str, batch: int, columns: dict | None) -> list[str]:
    args = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_steps", "2",
            "--trainer.default_root_dir", str(run), "--trainer.num_sanity_val_steps", "0",
            "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
            "--model.model", model, "--model.eval_max_new_tokens", "4",
            "--data.train_file", train, "--data.val_file", val, "--data.batch_size", str(batch),
            "--data.eval_batch_size", "6"]
    return args + (["--data.columns", json.dumps(columns)] if columns else [])


def sft(model, data, run, train, val, batch=3, columns=None):
    return _main("fit", "--config", _config("sft", run, data), *_common(model, run, train, val, batch, columns),
                 "--trainer.check_val_every_n_epoch", "1")


def grpo(model, data, run, train, val, init, batch=12, columns=None):
    return _main("fit", "--config", _config("grpo", run, data), *_common(model, run, train, val, batch, columns),
                 "--model.init_ckpt", str(init), "--model.group_size", "3",
                 "--model.engine.init_args.max_new_tokens", "6", "--trainer.val_check_interval", "null",
                 "--trainer.check_val_every_n_epoch", "1")


def _losses(run: Path) -> list[float]:
    rows = list(csv.DictReader((run / "logs" / "version_0" / "metrics.csv").open()))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def _check_rollout_media(module, n_images_of):
    """Every rollout row carries exactly its own record's images (0, 1 or 2; as tiles or patches):
    its media equal a fresh encoding of its record. Returns the image counts seen."""
    from lightning_r1v2.data.collate import encode_record

    r = module.last_rollouts
    kinds = set()
    for rec, media in zip(r.records, r.media):
        kinds.add(n_images_of[rec["id"]])
        want = encode_record(module.processor, rec)[2]
        assert media.keys() == want.keys(), (rec["id"], media.keys(), want.keys())
        assert all(torch.equal(media[k].cpu(), want[k]) for k in want), rec["id"]
        assert (want == {}) == (n_images_of[rec["id"]] == 0)
    return kinds


# the tiny default and qwen2_vl in the default suite; the other families with -m slow (about 10 s each)
OTHER_FAMILIES = [pytest.param(f, marks=pytest.mark.slow) for f in ("internvl", "llava", "gemma3", "qwen2_5_vl", "qwen3_vl")]


@pytest.mark.parametrize("model", ["tiny", "qwen2_vl", *OTHER_FAMILIES])
def test_multi_image_and_text_only_rows_through_every_stage(model, mixed, tmp_path):
    """geometry3k-layout parquet: SFT, then GRPO (buffer, rewards, monitors), validate, MPO on pairs
    read from parquet; the rollouts hold text-only, one- and two-image records, each with its images."""
    from lightning_r1v2.data.sources import read_source

    if model != "tiny":
        from tiny_families import build_family

        model = str(build_family(model, tmp_path / model))
    train, val = str(mixed / "train.parquet"), str(mixed / "val.parquet")
    records, _ = read_source(train, columns=GEO)
    n_images_of = {r["id"]: len(r.get("image", [])) for r in records}
    n_images_of.update({r["id"]: len(r.get("image", [])) for r in read_source(val, columns=GEO)[0]})
    assert sorted(set(n_images_of.values())) == [0, 1, 2]

    cli = sft(model, mixed, tmp_path / "sft", train, val, batch=6, columns=GEO)  # 2 steps: one epoch, then validation
    assert cli.trainer.global_step == 2
    losses = _losses(tmp_path / "sft")
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert "val/accuracy" in cli.trainer.callback_metrics  # evaluation by generation on the mixed rows
    ckpt = tmp_path / "sft" / "checkpoints" / "last.ckpt"

    cli = grpo(model, mixed, tmp_path / "grpo", train, val, ckpt, columns=GEO)
    assert cli.trainer.global_step == 2
    assert _check_rollout_media(cli.model, n_images_of) == {0, 1, 2}
    names = {type(cb).__name__: cb for cb in cli.trainer.callbacks}
    assert names["SelectiveSampleBuffer"]._calls > 0 and names["HallucinationMonitor"].last_stats
    assert "val/accuracy" in cli.trainer.callback_metrics

    # MPO: pairs as parquet rows (chosen = the reference, rejected = a wrong boxed answer)
    import datasets

    rows = []
    for r in datasets.load_dataset("parquet", data_files=[train], split="train").with_format("arrow")[:].to_pylist():
        wrong = str(int(r["answer"]) + 1) if r["answer"].isdigit() else "none"
        rows.append({**r, "chosen": r["solution"], "rejected": f"<think> </think> \\boxed{{{wrong}}}"})
    ds = datasets.Dataset.from_list(rows).cast_column("images", datasets.List(datasets.Image()))
    ds.to_parquet(str(tmp_path / "pairs.parquet"))
    mpo = _main("fit", "--config", _config("mpo", tmp_path / "mpo", mixed),
                *_common(model, tmp_path / "mpo", str(tmp_path / "pairs.parquet"), val, 6, GEO),
                "--model.init_ckpt", str(ckpt))  # reference: precomputed (the config), scored on these rows too
    assert mpo.trainer.global_step == 2
    seen = {n_images_of[p["id"]] for p in mpo.trainer.datamodule.train_records}
    assert seen == {0, 1, 2} and all(p["pair_id"] for p in mpo.trainer.datamodule.train_records)


@pytest.mark.parametrize("fmt", ["jsonl", "llava", "parquet", "hf"])
def test_sft_and_grpo_from_each_source(fmt, tmp_path):
    """The synthetic task written by ``make-data --format`` and read back by the DataModule."""
    from lightning_r1v2.data.synthetic import COLUMNS

    data = tmp_path / "data"
    _main("make-data", "--out", str(data), "--train", "6", "--val", "3", "--seed", "2", "--format", fmt)
    if fmt != "jsonl":  # the GRPO config's entropy callback reads val.jsonl
        _main("make-data", "--out", str(tmp_path / "j"), "--train", "1", "--val", "3", "--seed", "2")
        (data / "val.jsonl").write_text((tmp_path / "j" / "val.jsonl").read_text().replace('"images/', f'"{tmp_path}/j/images/'))
    train, val = (str(data / FILES[fmt].format(split=s)) for s in ("train", "val"))
    cli = sft("tiny", data, tmp_path / "sft", train, val, columns=COLUMNS.get(fmt))
    assert cli.trainer.global_step == 2 and len(cli.trainer.datamodule.train_records) == 6
    assert all(torch.isfinite(torch.tensor(_losses(tmp_path / "sft"))))
    ckpt = tmp_path / "sft" / "checkpoints" / "last.ckpt"
    cli = grpo("tiny", data, tmp_path / "grpo", train, val, ckpt, batch=6, columns=COLUMNS.get(fmt))
    assert cli.trainer.global_step == 2 and len(cli.model.last_rollouts) == 6 * 3


def test_the_buffer_replays_text_only_and_two_image_rows_with_their_own_media(mixed):
    """Rows of parquet records (references, not pixels) stored by the Selective Sample Buffer and
    replayed into a later batch keep their own images (or none), and the model takes them."""
    from lightning_r1v2.callbacks.buffer import SelectiveSampleBuffer
    from lightning_r1v2.data.collate import PromptCollator, encode_record
    from lightning_r1v2.data.sources import read_source
    from lightning_r1v2.modules.grpo import GRPOModule
    from lightning_r1v2.rollout.hf_engine import HFGenerateEngine
    from lightning_r1v2.rollout.types import Rollouts

    records, _ = read_source(str(mixed / "train.parquet"), columns=GEO)
    by_kind = {len(r.get("image", [])): r for r in records}
    g = 2
    m = GRPOModule(model="tiny", group_size=g, engine=HFGenerateEngine(max_new_tokens=4))
    m.configure_model()
    buf = SelectiveSampleBuffer(capacity=16, refill_share=1.0)
    seen = []
    for recs in ([by_kind[0], by_kind[2]], [by_kind[1], by_kind[1]]):
        r = m.engine.generate(m, PromptCollator(m.processor)(recs), g)
        # step 1: both groups effective (stored); step 2: both zero-variance (refilled from the buffer)
        effective = len(seen) == 0
        r.reward = torch.tensor([1.0, 0.0, 0.0, 1.0] if effective else [0.0] * 4)
        r.advantages = torch.tensor([1.0, -1.0, -1.0, 1.0] if effective else [0.0] * 4)
        r = buf.on_advantages(None, m, r) or r
        seen.append(r)
    replayed = seen[1]
    assert replayed.from_buffer.all()
    assert {len(rec.get("image", [])) for rec in replayed.records} <= {0, 2}
    for rec, media in zip(replayed.records, replayed.media):
        want = encode_record(m.processor, rec)[2]
        assert media.keys() == want.keys() and all(torch.equal(media[k], want[k]) for k in want), rec["id"]
    mixed_rows_ = Rollouts.concat(seen, pad_token_id=m.processor.tokenizer.pad_token_id)
    with torch.no_grad():
        logp, _ = m.sequence_logprobs(m.model, mixed_rows_)
    assert torch.isfinite(logp[mixed_rows_.completion_mask.bool()]).all()
