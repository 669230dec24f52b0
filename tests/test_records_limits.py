"""Record limits (issue 17): bombs, deep nesting, huge integers, long responses, paths outside the
data folder, malformed code tests, and lenient mode that leaves less than one batch."""
import json

import pytest
from PIL import Image

from lightning_r1v2.data.records import MAX_NESTING, MAX_RESPONSE_CHARS, RecordError, read_records

GOOD = {"id": "a", "image": "ok.png", "question": "How many red shapes are there?", "answer": "2"}


@pytest.fixture
def folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (48, 48), "white").save(data / "ok.png")
    Image.new("RGB", (48, 48), "white").save(tmp_path / "outside.png")
    return data


def write(folder, *records, raw_lines=()):
    path = folder / "d.jsonl"
    lines = [json.dumps(GOOD)] + [json.dumps(r) for r in records] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def strict_error(path, **kw) -> str:
    with pytest.raises(RecordError) as err:
        read_records(path, **kw)
    return str(err.value)


def lenient_skips(path, **kw):
    records, report = read_records(path, strict=False, **kw)
    return len(records), dict(report.skipped)


def test_decompression_bomb_is_a_bad_image_with_file_and_line(folder, monkeypatch):
    # PIL refuses images over twice MAX_IMAGE_PIXELS (a 20000x20000 PNG at the default 89.5M);
    # lowered here so the bomb is small: 100x100 = 10000 > 2 * 4000.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)
    Image.new("L", (100, 100)).save(folder / "bomb.png")
    path = write(folder, {**GOOD, "image": "bomb.png"})
    msg = strict_error(path)
    assert msg.startswith(f"{path}:2: image cannot be decoded (DecompressionBombError:")
    assert lenient_skips(path) == (1, {"bad_image": 1})


def test_json_nested_100k_deep_is_refused_with_file_and_line(folder):
    deep = '{"id": "b", "annotations": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path = write(folder, raw_lines=[deep])
    assert strict_error(path) == f"{path}:2: bad JSON (nested too deeply to parse)"
    assert lenient_skips(path) == (1, {"too_deep": 1})


def test_parseable_but_deep_record_is_refused(folder):
    nested = []
    for _ in range(MAX_NESTING):
        nested = [nested]
    path = write(folder, {**GOOD, "annotations": {"x": nested}})
    assert strict_error(path) == f"{path}:2: record is nested more than {MAX_NESTING} levels deep"


def test_5000_digit_integer_is_bad_json_with_file_and_line(folder):
    path = write(folder, raw_lines=['{"id": "b", "answer": ' + "7" * 5000 + "}"])
    msg = strict_error(path)
    assert msg.startswith(f"{path}:2: bad JSON (Exceeds the limit (4300 digits) for integer string conversion")
    assert lenient_skips(path) == (1, {"bad_json": 1})


def test_300k_character_response_is_too_long(folder):
    path = write(folder, {**GOOD, "response": "x" * 300_000})
    assert strict_error(path) == f"{path}:2: 'response' has 300000 characters (limit {MAX_RESPONSE_CHARS})"
    assert lenient_skips(path) == (1, {"too_long": 1})


@pytest.mark.parametrize("image", ["../outside.png", "ABS", ["ok.png", "./../outside.png"]])
def test_image_paths_outside_the_data_folder(folder, image):
    image = str(folder.parent / "outside.png") if image == "ABS" else image
    path = write(folder, {**GOOD, "image": image})
    msg = strict_error(path, allow_outside_paths=False)
    assert msg.startswith(f"{path}:2: image path ") and "points outside the data folder" in msg
    assert "allow_outside_paths: true" in msg
    assert lenient_skips(path, allow_outside_paths=False) == (1, {"image_outside": 1})
    records, _ = read_records(path, allow_outside_paths=True)  # opted in: read as before
    assert len(records) == 2


def test_symlink_out_of_the_data_folder_is_outside(folder):
    (folder / "link.png").symlink_to(folder.parent / "outside.png")
    path = write(folder, {**GOOD, "image": "link.png"})
    assert "points outside the data folder" in strict_error(path, allow_outside_paths=False)


def test_malformed_code_tests_are_bad_records(folder):
    path = write(folder, {**GOOD, "tests": [{"input": "2", "expected": "4"}]})
    assert strict_error(path) == (
        f"{path}:2: tests[0]: unknown test key(s) ['expected']; a test is {{'input', 'output'}} "
        "(or stdin/stdout, expected_output) or {'assert'}"
    )
    path = write(folder, {**GOOD, "tests": [{"assert": "assert f(2) == 4"}, {"assert": "assert f(2) == g(2)"}]})
    assert strict_error(path).startswith(f"{path}:2: tests[1]: one side of the comparison must be a Python literal")
    assert lenient_skips(path) == (1, {"bad_tests": 1})


def test_lenient_mode_leaving_less_than_min_records_is_an_error(folder):
    path = write(folder, {**GOOD, "image": "missing.png"})
    with pytest.raises(RecordError, match=r"1 usable records, fewer than 2 \(.*kept 1, skipped 1 \(missing_image: 1\)"):
        read_records(path, strict=False, min_records=2)


def test_datamodule_lenient_with_less_than_one_batch_is_an_error(folder, processor):
    from lightning_r1v2.data.datamodule import R1V2DataModule

    path = write(folder, {**GOOD, "image": "missing.png"}, {**GOOD, "id": "c"})
    dm = R1V2DataModule(train_file=str(path), val_file=None, kind="prompts", batch_size=3, strict=False)
    dm.processor = processor
    with pytest.raises(ValueError, match=r"2 usable training records, fewer than one batch on each rank \(3; skipped: \{'missing_image': 1\}\)"):
        dm.setup("fit")
    ok = R1V2DataModule(train_file=str(path), val_file=None, kind="prompts", batch_size=2, strict=False)
    ok.processor = processor
    ok.setup("fit")
    assert len(ok.train_records) == 2


def test_datamodule_skips_and_counts_long_sft_responses(folder, processor):
    from lightning_r1v2.data.datamodule import R1V2DataModule

    long = " ".join(["red"] * 200)
    path = write(folder, {**GOOD, "id": "b", "response": long}, {**GOOD, "id": "c", "response": "two"})
    path.write_text("\n".join(path.read_text().splitlines()[1:]) + "\n")  # drop GOOD: it has no response
    dm = R1V2DataModule(train_file=str(path), val_file=None, kind="sft", batch_size=1, max_response_tokens=50,
                        max_prompt_tokens=10_000)
    dm.processor = processor
    dm.setup("fit")
    assert [r["id"] for r in dm.train_records] == ["c"] and dm.skipped == {"response_too_long": 1}
