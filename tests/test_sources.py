"""Record sources (``data/sources.py``): every format gives the same records and batches, images
stay lazy references until a batch is built, and every bad row gets ``file:row: reason`` (strict)
or a counted skip (lenient)."""
from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_r1v2.data.records import RecordError, read_records
from lightning_r1v2.data.sources import fit_pixels, open_image, read_source
from lightning_r1v2.data.synthetic import COLUMNS, make_data

FORMATS = ("jsonl", "llava", "parquet", "hf")
FILES = {"jsonl": "{split}.jsonl", "llava": "{split}.json", "parquet": "{split}.parquet", "hf": "{split}"}


@pytest.fixture(scope="module")
def every_format(tmp_path_factory):
    """The same synthetic records (seed 11) written in each format."""
    root = tmp_path_factory.mktemp("formats")
    for fmt in FORMATS:
        make_data(str(root / fmt), train=12, val=4, seed=11, format=fmt)
    return root


def _path(root, fmt, split="train"):
    return str(root / fmt / FILES[fmt].format(split=split))


def _png(size=(16, 16), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_every_format_reads_the_same_records(every_format):
    want, _ = read_source(_path(every_format, "jsonl"))
    for fmt in FORMATS[1:]:
        got, report = read_source(_path(every_format, fmt), columns=COLUMNS.get(fmt))
        assert report.kept == 12 and report.total_skipped == 0
        for a, b in zip(want, got):
            for key in ("id", "question", "answer", "choices", "response", "annotations", "type"):
                assert a.get(key) == b.get(key), (fmt, key, a.get(key), b.get(key))
            assert len(b["image"]) == 1
            with open_image(a["image"][0]) as x, open_image(b["image"][0]) as y:
                assert x.tobytes() == y.tobytes() and x.size == y.size
    # the llava question had "<image>\n" before it, the parquet one "<image>" (geometry3k): both removed
    assert json.loads(Path(_path(every_format, "llava")).read_text())[0]["conversations"][0]["value"].startswith("<image>\n")


def test_embedded_images_are_references_not_pixels(every_format):
    recs, _ = read_source(_path(every_format, "parquet"), columns=COLUMNS["parquet"])
    ref = recs[5]["image"][0]
    assert ref == {"dataset": f"parquet:{Path(_path(every_format, 'parquet')).resolve()}", "row": 5,
                   "column": "images", "index": 0}
    assert recs[5]["_source"].endswith("train.parquet:row 5")
    hf, _ = read_source(_path(every_format, "hf"))
    assert hf[2]["image"][0]["index"] is None and hf[2]["image"][0]["column"] == "image"  # one image, not a list
    # plain data: survives the trip a checkpoint or a DataLoader worker makes
    buf = io.BytesIO()
    torch.save(recs[:2], buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True) == recs[:2]


@pytest.mark.parametrize("kind", ["sft", "prompts"])
def test_every_format_gives_the_same_batches(every_format, processor, kind):
    """Through the DataModule (shuffled loader, length filter, collator): ids, prompts, labels, pixels."""
    from lightning_r1v2.data.datamodule import R1V2DataModule

    def batches(fmt):
        dm = R1V2DataModule(train_file=_path(every_format, fmt), val_file=_path(every_format, fmt, "val"),
                            kind=kind, batch_size=4, eval_batch_size=4, columns=COLUMNS.get(fmt))
        dm.processor = processor
        dm.setup("fit")
        return list(dm.train_dataloader()) + list(dm.val_dataloader())

    want = batches("jsonl")
    assert len(want) == 4
    for fmt in FORMATS[1:]:
        got = batches(fmt)
        assert len(got) == len(want)
        for a, b in zip(want, got):
            assert [r["id"] for r in a["records"]] == [r["id"] for r in b["records"]]
            for key in ("input_ids", "attention_mask") + (("labels",) if "labels" in a else ()):
                assert torch.equal(a[key], b[key]), (fmt, key)
            for ma, mb in zip(a["media"], b["media"]):
                assert ma.keys() == mb.keys() and torch.equal(ma["pixel_values"], mb["pixel_values"]), fmt


def test_references_are_read_in_dataloader_workers(every_format, processor):
    """A DataLoader worker (forked) reads the references and builds the same batch as the main process."""
    from lightning_r1v2.data.datamodule import R1V2DataModule

    out = []
    for workers in (0, 1):
        dm = R1V2DataModule(train_file=_path(every_format, "hf"), val_file=None, kind="prompts", batch_size=4,
                            num_workers=workers)
        dm.processor = processor
        dm.setup("fit")
        out.append(next(iter(dm.train_dataloader())))
    assert [r["id"] for r in out[0]["records"]] == [r["id"] for r in out[1]["records"]]
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(out[0]["media"], out[1]["media"]))


# ------------------------------------------------------------------------------- bad rows
def _parquet(path: Path, rows: list[dict], image_column="images", many=True, cast=True) -> str:
    """Rows as parquet; ``cast``: the image column as ``datasets.Image`` (which embeds the files it names)."""
    import datasets

    ds = datasets.Dataset.from_list(rows)
    if cast:
        ds = ds.cast_column(image_column, datasets.List(datasets.Image()) if many else datasets.Image())
    ds.to_parquet(str(path))
    return str(path)


GOOD = {"images": [{"bytes": _png(), "path": "a.png"}], "problem": "<image>How many red shapes?", "answer": "1"}
GEO = {"question_key": "problem", "image_key": "images"}


def _geo(**bad):
    return [GOOD, {**GOOD, **bad}]


# name -> (rows; row 1 is the bad one, skip counter key, words the strict error must contain)
PARQUET_CASES = {
    "placeholder_no_image": (_geo(images=[], problem="<image>How many red shapes?"), "image_placeholder",
                             "'question' holds 1 <image> placeholder(s) but the record has 0 image(s)"),
    "placeholders_outnumber_images": (_geo(problem="<image><image>Which is bigger?"), "image_placeholder",
                                      "'question' holds 2 <image> placeholder(s) but the record has 1 image(s)"),
    "other_placeholder_text": (_geo(problem="<image>Count the <IMG_CONTEXT> cells"), "image_placeholder",
                               "'question' contains the image placeholder text <IMG_CONTEXT>"),
    "corrupt_embedded_image": (_geo(images=[{"bytes": b"\x89PNG not really", "path": "x.png"}]), "bad_image",
                               "image cannot be decoded (UnidentifiedImageError"),
    "truncated_embedded_image": (_geo(images=[{"bytes": _png((64, 64))[:60], "path": "t.png"}]), "bad_image",
                                 "image cannot be decoded"),
    "null_image_in_list": (_geo(images=[{"bytes": _png(), "path": "a.png"}, None]), "wrong_type",
                           "column 'images': image 1 is NoneType None, expected bytes, a path or {'bytes', 'path'}"),
    "missing_image_path": (_geo(images=[{"bytes": None, "path": "nowhere.png"}]), "missing_image", "image not found"),
    "null_answer": (_geo(answer=None), "missing_field", "missing field 'answer'"),
    "empty_question": (_geo(problem="<image>  "), "empty_field", "'question' is empty"),
}


@pytest.mark.parametrize("name", sorted(PARQUET_CASES))
def test_parquet_bad_row_strict_names_file_and_row(name, tmp_path):
    rows, kind, words = PARQUET_CASES[name]
    path = _parquet(tmp_path / f"{name}.parquet", rows, cast=name != "missing_image_path")
    with pytest.raises(RecordError) as e:
        read_source(path, columns=GEO)
    assert str(e.value).startswith(f"{path}:row 1: ") and words in str(e.value), str(e.value)


@pytest.mark.parametrize("name", sorted(PARQUET_CASES))
def test_parquet_bad_row_lenient_is_skipped_and_counted(name, tmp_path, caplog):
    rows, kind, words = PARQUET_CASES[name]
    path = _parquet(tmp_path / f"{name}.parquet", rows, cast=name != "missing_image_path")
    with caplog.at_level(logging.WARNING, logger="lightning_r1v2.data"):
        records, report = read_source(path, columns=GEO, strict=False)
    assert len(records) == 1 and records[0]["_source"] == f"{path}:row 0"
    assert dict(report.skipped) == {kind: 1}
    assert f"{path}:row 1: " in caplog.text and f"kept 1, skipped 1 ({kind}: 1)" in caplog.text


def test_a_mapped_column_that_does_not_exist_lists_the_columns(tmp_path):
    path = _parquet(tmp_path / "geo.parquet", [GOOD])
    with pytest.raises(ValueError, match=r"geo\.parquet: column 'question' \(question_key\) does not exist; "
                                         r"the columns are \['images', 'problem', 'answer'\]"):
        read_source(path)  # the default question_key is 'question'
    with pytest.raises(ValueError, match=r"column 'imgs' \(image_key\) does not exist"):
        read_source(path, columns={"question_key": "problem", "image_key": "imgs"})
    with pytest.raises(ValueError, match=r"column 'sol' \(response_key\) does not exist"):
        read_source(path, columns={**GEO, "response_key": "sol"})  # optional, but named: must exist
    with pytest.raises(ValueError, match=r"columns: unknown key\(s\) \['prompt_key'\]; the keys are \['question_key'"):
        read_source(path, columns={"prompt_key": "problem"})


def test_the_datamodule_checks_its_settings_when_built():
    from lightning_r1v2.data.datamodule import R1V2DataModule

    with pytest.raises(ValueError, match=r"unknown key\(s\) \['prompt_key'\]"):
        R1V2DataModule(columns={"prompt_key": "problem"})
    with pytest.raises(ValueError, match="format must be one of"):
        R1V2DataModule(format="csv")
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        R1V2DataModule(min_pixels=500, max_pixels=100)


def test_a_datasetdict_folder_names_its_splits(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"question": "q", "answer": "a"}]),
                               "test": datasets.Dataset.from_list([{"question": "q", "answer": "a"}])})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"dd: a DatasetDict with splits \['train', 'test'\]; name one split's folder"):
        read_source(str(tmp_path / "dd"))
    records, _ = read_source(str(tmp_path / "dd" / "train"))  # which is a dataset of text-only rows
    assert records[0]["question"] == "q" and "image" not in records[0] and records[0]["id"] == "train-0"


def test_images_as_paths_and_several_per_row(tmp_path):
    """A column of paths (relative to the dataset's folder), a multi-image row, a text-only row."""
    (tmp_path / "img").mkdir()
    for name, colour in (("a.png", (255, 0, 0)), ("b.png", (0, 0, 255))):
        Image.new("RGB", (16, 16), colour).save(tmp_path / "img" / name)
    rows = [{"pics": ["img/a.png", "img/b.png"], "q": "<image>\n<image>\nSame colour?", "a": "no", "uid": "x"},
            {"pics": [], "q": "What is 2 + 3?", "a": "5", "uid": "y"}]
    import datasets

    path = tmp_path / "paths.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    records, _ = read_source(str(path), columns={"question_key": "q", "answer_key": "a", "image_key": "pics",
                                                  "id_key": "uid"})
    assert records[0]["image"] == [str(tmp_path / "img/a.png"), str(tmp_path / "img/b.png")]
    assert records[0]["question"] == "Same colour?" and records[0]["id"] == "x"
    assert "image" not in records[1] and records[1]["id"] == "y"


def test_a_column_under_our_name_never_stands_in_for_the_mapped_one(tmp_path):
    rows = [{**GOOD, "question": "an unrelated column"}, {**GOOD, "problem": None, "question": "an unrelated column"}]
    path = _parquet(tmp_path / "both.parquet", rows)
    records, report = read_source(path, columns=GEO, strict=False)
    assert [r["question"] for r in records] == ["How many red shapes?"] and dict(report.skipped) == {"missing_field": 1}


def test_a_glob_reads_every_shard_and_names_each(tmp_path):
    for i in range(2):
        _parquet(tmp_path / f"part-{i}.parquet", [GOOD, {**GOOD, "answer": str(i + 5)}])
    records, report = read_source(str(tmp_path / "part-*.parquet"), columns=GEO)
    assert report.kept == 4 and [r["answer"] for r in records] == ["1", "5", "1", "6"]
    assert records[3]["_source"] == f"{tmp_path / 'part-1.parquet'}:row 1"


# ---------------------------------------------------------------------------------- LLaVA
def _llava(tmp_path, items) -> Path:
    Image.new("RGB", (16, 16), (0, 200, 0)).save(tmp_path / "ok.png")
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(items))
    return path


def _conv(question, reply="<think> green 1 </think> \\boxed{1}"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": reply}]


LLAVA_GOOD = {"id": "g", "image": "ok.png", "conversations": _conv("<image>\nHow many green shapes?")}
LLAVA_CASES = {
    "placeholder_no_image": ({"id": "b", "conversations": _conv("<image>\nHow many green shapes?")},
                             "image_placeholder", "'question' holds 1 <image> placeholder(s) but the record has 0 image(s)"),
    "two_placeholders_one_image": ({**LLAVA_GOOD, "conversations": _conv("<image>\n<image>\nSame?")},
                                   "image_placeholder", "holds 2 <image> placeholder(s) but the record has 1 image(s)"),
    "multi_turn": ({**LLAVA_GOOD, "conversations": _conv("<image>\nQ?") + _conv("More?")}, "unsupported_turns",
                   "conversation turns ['human', 'gpt', 'human', 'gpt']: only one human turn"),
    "no_conversations": ({"id": "b", "image": "ok.png"}, "missing_field", "missing field 'conversations'"),
    "missing_image": ({**LLAVA_GOOD, "image": "nope.png"}, "missing_image", "image not found"),
    "image_not_a_path": ({**LLAVA_GOOD, "image": 7}, "wrong_type", "'image' must be a path or a non-empty list"),
    "not_an_object": (["a list"], "not_an_object", "entry is a list, expected a JSON object"),
}


@pytest.mark.parametrize("name", sorted(LLAVA_CASES))
def test_llava_bad_entry(name, tmp_path, caplog):
    item, kind, words = LLAVA_CASES[name]
    path = _llava(tmp_path, [LLAVA_GOOD, item])
    with pytest.raises(RecordError) as e:
        read_source(path)
    assert str(e.value).startswith(f"{path}:entry 1: ") and words in str(e.value), str(e.value)
    with caplog.at_level(logging.WARNING, logger="lightning_r1v2.data"):
        records, report = read_source(path, strict=False)
    assert [r["id"] for r in records] == ["g"] and dict(report.skipped) == {kind: 1}
    assert f"{path}:entry 1: " in caplog.text


def test_llava_records(tmp_path):
    items = [LLAVA_GOOD,
             {"id": "two", "image": ["ok.png", "ok.png"], "conversations": _conv("<image>\n<image>\nSame?", "yes")},
             {"id": "txt", "conversations": _conv("What is 2 + 3?", "<think> 2 plus 3 </think> \\boxed{5}")},
             {"id": "pre", "image": "ok.png", "answer": "1", "conversations": _conv("How many? (no mark)")},
             {"id": "prompt_only", "image": "ok.png", "answer": "1", "conversations": [{"from": "human", "value": "Q?"}]}]
    records, _ = read_source(_llava(tmp_path, items))
    r = {x["id"]: x for x in records}
    assert r["g"]["question"] == "How many green shapes?" and r["g"]["answer"] == "1"  # from \boxed{}
    assert r["g"]["response"] == "<think> green 1 </think> \\boxed{1}"
    assert r["two"]["image"] == [str(tmp_path / "ok.png")] * 2 and r["two"]["answer"] == "yes"  # no box: the reply
    assert "image" not in r["txt"] and r["txt"]["answer"] == "5"
    assert r["pre"]["image"] == [str(tmp_path / "ok.png")]  # no mark: the images go first, as always
    assert "response" not in r["prompt_only"]


def test_llava_file_errors(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"id": "a",\n "conversations": [}]')
    with pytest.raises(RecordError, match=r"broken\.json:2: bad JSON"):
        read_source(path)
    path.write_text('{"id": "a"}')
    with pytest.raises(RecordError, match=r"broken\.json: expected a JSON list of LLaVA objects, got a dict"):
        read_source(path)
    with pytest.raises(ValueError, match="columns apply to hf, parquet and arrow sources, not llava"):
        read_source(path, columns={"question_key": "q"})


def test_a_text_only_jsonl_record_is_read(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"id": "t", "question": "What is 2 + 3?", "answer": 5}) + "\n"
                    + json.dumps({"id": "n", "image": None, "question": "And 1 + 1?", "answer": "2"}) + "\n")
    records, _ = read_records(path)
    assert [r.get("image") for r in records] == [None, None] and records[0]["answer"] == "5"


# ------------------------------------------------------------------------------ big images
def test_fit_pixels_keeps_the_aspect():
    # 4000 x 3000 = 12e6 px into 1e6: scale sqrt(1/12) = 0.2887 -> 1154 x 866 (floored, 999,364 px)
    assert fit_pixels((4000, 3000), max_pixels=1_000_000) == (1154, 866)
    # 10 x 40 = 400 px up to 1600: scale 2 -> 20 x 80
    assert fit_pixels((10, 40), min_pixels=1600) == (20, 80)
    assert fit_pixels((30, 30), min_pixels=100, max_pixels=10_000) == (30, 30)


def test_load_images_scales_into_the_records_pixel_bounds(tmp_path):
    from lightning_r1v2.data.collate import load_images

    Image.new("RGB", (10, 40), (9, 9, 9)).save(tmp_path / "thin.png")
    Image.new("RGB", (400, 300), (9, 9, 9)).save(tmp_path / "wide.png")
    rec = {"image": [str(tmp_path / "thin.png"), str(tmp_path / "wide.png")]}
    assert [im.size for im in load_images(rec)] == [(10, 40), (400, 300)]
    rec["_resize"] = [1600, 12 * 100 * 100]  # thin: x2 up to 20 x 80; wide: 120,000 px, within bounds
    assert [im.size for im in load_images(rec)] == [(20, 80), (400, 300)]
    rec["_resize"] = [0, 300 * 100]  # wide: scale 0.5 -> 200 x 150
    assert [im.size for im in load_images(rec)] == [(10, 40), (200, 150)]


def _qwen_without_a_pixel_cap(tmp_path):
    """The tiny qwen2_vl folder with Qwen2-VL's stock pixel bound (12.8M px): big images, many patches."""
    from tiny_families import build_family

    folder = build_family("qwen2_vl", tmp_path / "qwen_big")
    cfg_path = folder / "processor_config.json"
    cfg = json.loads(cfg_path.read_text())
    ip = cfg.get("image_processor", cfg)
    ip["size"] = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384}
    ip.pop("max_pixels", None), ip.pop("min_pixels", None)
    cfg_path.write_text(json.dumps(cfg))
    return folder


def test_a_huge_image_is_a_counted_skip_or_resized(tmp_path, caplog):
    """A 1600 x 1200 image gives the tiny Qwen2-VL (8 px patches, 2x2 merge) 7,500 image tokens: skipped with a
    message naming its size; with ``max_pixels`` it is scaled down before the processor and kept."""
    from lightning_r1v2.data.collate import PromptCollator
    from lightning_r1v2.data.datamodule import R1V2DataModule, prompt_length
    from lightning_r1v2.models.loading import load_policy_processor

    proc = load_policy_processor(str(_qwen_without_a_pixel_cap(tmp_path)))
    rows = [{**GOOD, "problem": "<image>Small?"},
            {**GOOD, "images": [{"bytes": _png((1600, 1200)), "path": "big.png"}], "problem": "<image>Big?"}]
    path = _parquet(tmp_path / "big.parquet", rows)
    dm = R1V2DataModule(train_file=path, val_file=None, kind="prompts", batch_size=1, max_prompt_tokens=256, columns=GEO)
    dm.processor = proc
    with caplog.at_level(logging.WARNING, logger="lightning_r1v2.data"):
        dm.setup("fit")
    assert [r["question"] for r in dm.train_records] == ["Small?"] and dm.skipped == {"prompt_too_long": 1}
    assert "big.parquet:row 1: prompt has 7" in caplog.text and "images of [(1600, 1200)] pixels" in caplog.text
    assert "max_pixels resizes them" in caplog.text

    dm = R1V2DataModule(train_file=path, val_file=None, kind="prompts", batch_size=2, max_prompt_tokens=256, columns=GEO,
                        max_pixels=128 * 96)
    dm.processor = proc
    dm.setup("fit")
    assert len(dm.train_records) == 2 and not dm.skipped
    big = dm.train_records[1]
    batch = PromptCollator(proc)([big])
    grid = batch["media"][0]["image_grid_thw"][0].tolist()
    assert grid == [1, 12, 16]  # 1600 x 1200 scaled to 128 x 96 px: 16 x 12 patches of 8 px
    assert batch["attention_mask"].sum().item() == prompt_length(proc, big)  # the filter counts the resized image


def test_the_readme_yaml_of_a_parquet_source_builds_the_datamodule():
    """The README's example is real settings, not drifted prose."""
    import yaml

    from lightning_r1v2.data.datamodule import R1V2DataModule

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## Records", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    data = yaml.safe_load(block)["data"]
    assert data["class_path"] == "lightning_r1v2.data.datamodule.R1V2DataModule"
    dm = R1V2DataModule(**data["init_args"])
    assert dm.hparams.columns["image_key"] == "images" and dm.hparams.max_pixels == 1280 * 28 * 28


def test_arrow_shards_read_as_the_hf_folder_they_come_from(every_format):
    folder = Path(_path(every_format, "hf"))
    shards = str(folder / "data-*.arrow")
    got, _ = read_source(shards)  # format auto: .arrow
    want, _ = read_source(str(folder))
    assert [r["id"] for r in got] == [r["id"] for r in want] and len(got) == 12
    assert got[0]["image"][0]["dataset"].startswith("arrow:") and got[0]["_source"].endswith(".arrow:row 0")
    with open_image(got[4]["image"][0]) as a, open_image(want[4]["image"][0]) as b:
        assert a.tobytes() == b.tobytes()


def test_a_bad_row_of_a_save_to_disk_folder_names_folder_and_row(tmp_path):
    import datasets

    rows, kind, words = PARQUET_CASES["placeholder_no_image"]
    folder = tmp_path / "geo"
    datasets.Dataset.from_list(rows).cast_column("images", datasets.List(datasets.Image())).save_to_disk(str(folder))
    with pytest.raises(RecordError, match=rf"^{folder}:row 1: {re.escape(words)}"):
        read_source(str(folder), columns=GEO)
    records, report = read_source(str(folder), columns=GEO, strict=False)
    assert len(records) == 1 and dict(report.skipped) == {kind: 1}


def test_build_pairs_writes_text_only_and_multi_image_records_back(tmp_path):
    """``jobs/sampling.output_record`` (build-pairs, prefilter) on records read from JSONL: read back the same."""
    from lightning_r1v2.jobs.sampling import output_record

    Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp_path / "a.png")
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "t", "question": "What is 2 + 3?", "answer": "5"}) + "\n"
                   + json.dumps({"id": "m", "image": ["a.png", "a.png"], "question": "Same?", "answer": "yes"}) + "\n")
    records, _ = read_records(src)
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps(output_record(r, tmp_path)) + "\n" for r in records))
    assert [json.loads(line).get("image") for line in out.read_text().splitlines()] == [None, ["a.png", "a.png"]]
    again, _ = read_records(out)
    assert [r.get("image") for r in again] == [r.get("image") for r in records]
