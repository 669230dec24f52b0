"""``evaluate``, ``build-pairs`` and ``prefilter`` read every record source (``format`` / ``columns``):
the same records give the same metrics as JSONL, embedded images come out as files beside the
JSONL output (each once, same pixels), and bad rows name ``file:row N``."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_r1v2.data.pairs import read_pairs
from lightning_r1v2.data.records import RecordError, read_records
from lightning_r1v2.data.sources import open_image, read_source
from lightning_r1v2.data.synthetic import COLUMNS, _dataset, make_data
from lightning_r1v2.jobs.sampling import EmbeddedImages, output_record

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import cli  # noqa: E402

N_VAL = 4


def first_passes(completions, id, **kwargs):
    """A fake accuracy: the first sample of each record passes, the others fail (every prompt is mixed)."""
    seen: set[str] = set()
    out = []
    for rid in id:
        out.append(0.0 if rid in seen else 1.0)
        seen.add(rid)
    return out


REWARDS = json.dumps([{"class_path": "lightning_r1v2.rewards.RewardCallback",
                       "init_args": {"fn": f"{__name__}.first_passes", "name": "accuracy", "weight": 1.0}}])
PARQUET_COLUMNS = json.dumps(COLUMNS["parquet"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The same synthetic records (seed 0) as JSONL, parquet (geometry3k's columns) and an hf folder."""
    root = tmp_path_factory.mktemp("job_sources")
    for fmt in ("jsonl", "parquet", "hf"):
        make_data(str(root / fmt), train=6, val=N_VAL, seed=0, format=fmt)
    return {"jsonl": root / "jsonl" / "val.jsonl", "parquet": root / "parquet" / "val.parquet",
            "hf": root / "hf" / "val", "root": root}


def _args(fmt):
    return ["--columns", PARQUET_COLUMNS] if fmt == "parquet" else []


def _pixels(entry) -> np.ndarray:
    with open_image(entry) as im:
        return np.asarray(im.convert("RGB"))


def _source(data, fmt):
    cols = COLUMNS.get(fmt)
    return {r["id"]: r for r in read_source(data[fmt], columns=cols)[0]}


@pytest.fixture(scope="module")
def policy():
    """The tiny policy with its weights perturbed: the random init answers every prompt alike
    (newlines), this one's greedy answers depend on the question and the pixels."""
    from lightning_r1v2.jobs.sampling import load_policy_module

    module = load_policy_module("tiny")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return module


def _evaluate(monkeypatch, policy, path, out, *extra):
    from lightning_r1v2.jobs import sampling

    monkeypatch.setattr(sampling, "load_policy_module", lambda ckpt, **kw: policy)  # evaluate imports it when run
    cli.main(["evaluate", "--ckpt_path", "tiny", "--data", str(path), "--out", str(out), "--max_new_tokens", "6",
              "--batch_size", "2", *extra])
    metrics = json.loads(Path(out).read_text())
    metrics.pop("seconds")
    return metrics


def test_the_perturbed_policy_sees_the_pixels(data, policy):
    from lightning_r1v2.jobs.evaluate import evaluate_module

    records = read_source(data["parquet"], columns=COLUMNS["parquet"])[0]
    swapped = [{**r, "image": records[(i + 1) % len(records)]["image"]} for i, r in enumerate(records)]
    texts = evaluate_module(policy, records, 2, 6)["completions"]
    assert len(set(texts)) == len(texts)
    assert evaluate_module(policy, swapped, 2, 6)["completions"] != texts  # same questions, other images


@pytest.mark.parametrize("fmt", ["parquet", "hf"])
def test_evaluate_on_a_dataset_matches_jsonl(data, policy, monkeypatch, tmp_path, fmt):
    want = _evaluate(monkeypatch, policy, data["jsonl"], tmp_path / "jsonl.json")
    got = _evaluate(monkeypatch, policy, data[fmt], tmp_path / f"{fmt}.json", *_args(fmt))
    assert got["n"] == N_VAL and "majority_baseline" in got  # the default reference: train beside val
    assert got == want  # same records, prompts and pixels, greedy: the same completions and metrics


def test_evaluate_reference_reads_the_same_source(data, policy, monkeypatch, tmp_path):
    ref = data["root"] / "parquet" / "train.parquet"
    got = _evaluate(monkeypatch, policy, data["parquet"], tmp_path / "p.json", *_args("parquet"),
                    "--reference", str(ref))
    want = _evaluate(monkeypatch, policy, data["jsonl"], tmp_path / "j.json",
                     "--reference", str(data["root"] / "jsonl" / "train.jsonl"))
    assert got["majority_baseline"] == want["majority_baseline"]
    # a JSONL reference beside parquet data: read as JSONL, the parquet columns not applied to it
    mixed = _evaluate(monkeypatch, policy, data["parquet"], tmp_path / "m.json", *_args("parquet"),
                      "--reference", str(data["root"] / "jsonl" / "train.jsonl"))
    assert mixed["majority_baseline"] == want["majority_baseline"]


def _check_written_images(rows, out, source, many: bool):
    """Every row's image is a file under ``<out stem>.images/`` whose pixels are the embedded image's."""
    folder = out.parent / f"{out.stem}.images"
    names = set()
    for row in rows:
        rid = row["id"].split("/")[0]
        ref = source[rid]["image"]
        assert len(ref) == 1
        rel = row["image_rel"]
        rel = rel if isinstance(rel, str) else rel[0]
        assert Path(out.parent / rel).parent == folder
        assert (_pixels(row["image"][0]) == _pixels(ref[0])).all()
        stem = f"val-{ref[0]['row']}" + ("_0" if many else "")
        assert Path(rel).name == f"{stem}.png"
        names.add(Path(rel).name)
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)  # one file per distinct image


def test_prefilter_on_parquet_writes_images_beside_its_output(data, tmp_path):
    out = tmp_path / "kept" / "val.kept.jsonl"
    cli.main(["prefilter", "--ckpt_path", "tiny", "--data", str(data["parquet"]), *_args("parquet"),
              "--out", str(out), "--k", "2", "--max_new_tokens", "2", "--rewards", REWARDS])
    kept, report = read_records(out, allow_outside_paths=False)  # images under the output's folder
    source = _source(data, "parquet")
    assert [r["id"] for r in kept] == list(source) and report.kept == N_VAL
    assert all(r["pass_rate"] == 0.5 for r in kept)
    _check_written_images(kept, out, source, many=True)


def test_build_pairs_on_hf_writes_images_once(data, tmp_path):
    out = tmp_path / "pairs.jsonl"
    cli.main(["build-pairs", "--ckpt_path", "tiny", "--data", str(data["hf"]), "--out", str(out),
              "--num_samples", "3", "--temperature", "1.5", "--max_new_tokens", "3", "--rewards", REWARDS])
    pairs, _ = read_pairs(out)
    source = _source(data, "hf")
    assert len(pairs) >= N_VAL  # every question has a passing first sample and failing others
    assert {p["pair_id"].split("/")[0] for p in pairs} == set(source)
    assert all(p["id"] in source for p in pairs)
    _check_written_images(pairs, out, source, many=False)  # several pairs per question share one file


def test_output_record_writes_each_embedded_image_once(data, tmp_path):
    rec = next(iter(_source(data, "parquet").values()))
    embedded = EmbeddedImages.beside(tmp_path / "out.jsonl")
    first = output_record(rec, tmp_path, embedded)
    path = tmp_path / first["image"][0]
    path.write_bytes(b"left alone")  # a second write would replace this
    assert output_record(rec, tmp_path, embedded) == first and path.read_bytes() == b"left alone"
    assert "_source" not in first and first["id"] == rec["id"]
    with pytest.raises(ValueError, match="embedded image needs a place"):
        output_record(rec, tmp_path)


def _bad_parquet(data, tmp_path, row: int, **change) -> Path:
    import datasets

    rows = datasets.Dataset.from_parquet(str(data["parquet"])).cast_column(
        "images", datasets.List(datasets.Image(decode=False))).to_list()
    rows[row].update(change)
    path = tmp_path / "bad.parquet"
    _dataset(rows, "images", many=True).to_parquet(str(path))
    return path


@pytest.mark.parametrize("change, reason", [
    ({"images": [{"bytes": b"not a png", "path": "x.png"}]}, "cannot be decoded"),
    ({"answer": None}, "answer"),
])
def test_a_bad_parquet_row_is_named(data, tmp_path, change, reason):
    path = _bad_parquet(data, tmp_path, 2, **change)
    with pytest.raises(RecordError, match=rf"bad\.parquet:row 2: .*{reason}"):
        cli.main(["evaluate", "--ckpt_path", "tiny", "--data", str(path), *_args("parquet")])


def test_unknown_format_is_a_clear_error(data, tmp_path):
    for job in ("evaluate", "prefilter", "build-pairs"):
        with pytest.raises(ValueError, match="format must be one of"):
            cli.main([job, "--ckpt_path", "tiny", "--data", str(data["parquet"]), "--format", "csv"])
    with pytest.raises(ValueError, match="unknown key"):
        cli.main(["evaluate", "--ckpt_path", "tiny", "--data", str(data["parquet"]), "--columns", '{"question": "q"}'])
