import json
import logging

import pytest
from PIL import Image

from lightning_r1v2.data.records import RecordError, read_records


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (48, 48), "white").save(tmp_path / "ok.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    good = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(good[: len(good) // 2])
    return tmp_path


GOOD = {"id": "a", "image": "ok.png", "question": "How many red shapes are there?", "answer": "2"}

# (line content, counter key, words the error message must contain)
BAD = [
    ("{not json", "bad_json", "bad JSON"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "answer"}), "missing_field", "missing field 'answer'"),
    (json.dumps({**GOOD, "image": "nope.png"}), "missing_image", "image not found"),
    (json.dumps({**GOOD, "image": "empty.png"}), "bad_image", "empty file"),
    (json.dumps({**GOOD, "image": "text.png"}), "bad_image", "cannot be decoded"),
    (json.dumps({**GOOD, "image": "trunc.png"}), "bad_image", "cannot be decoded"),
    (json.dumps({**GOOD, "question": 7}), "wrong_type", "'question' must be a string"),
    (json.dumps({**GOOD, "answer": "  "}), "empty_field", "'answer' is empty"),
    (json.dumps({**GOOD, "choices": "ABCD"}), "wrong_type", "'choices'"),
    (json.dumps({**GOOD, "question": "x" * 10_000}), "too_long", "10000 characters"),
    (json.dumps([1, 2]), "not_an_object", "JSON object"),
]


@pytest.mark.parametrize("line,kind,words", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_strict_mode_names_file_and_line(folder, line, kind, words):
    path = folder / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n")
    with pytest.raises(RecordError) as e:
        read_records(path, strict=True)
    assert str(e.value).startswith(f"{path}:3: ")  # blank line 2 is skipped but still counted as a line
    assert words in str(e.value)


def test_lenient_mode_counts_every_skip(folder, caplog):
    path = folder / "data.jsonl"
    lines = [json.dumps(GOOD)] + [b[0] for b in BAD] + [json.dumps({**GOOD, "id": "z", "answer": 3})]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"id": "\xff\xfe"}\n')
    with caplog.at_level(logging.WARNING, logger="lightning_r1v2.data"):
        records, report = read_records(path, strict=False)
    assert [r["id"] for r in records] == ["a", "z"]
    assert records[1]["answer"] == "3"  # numbers coerced to text
    assert report.kept == 2 and report.total_skipped == len(BAD) + 1
    assert report.skipped["not_utf8"] == 1 and report.skipped["bad_image"] == 3
    assert "skipped" in caplog.text and "data.jsonl:2:" in caplog.text


def test_image_paths_are_relative_to_the_file(folder):
    sub = folder / "sub"
    sub.mkdir()
    Image.new("RGB", (8, 8)).save(sub / "x.png")
    (sub / "d.jsonl").write_text(json.dumps({**GOOD, "image": ["x.png", "x.png"]}) + "\n")
    records, _ = read_records(sub / "d.jsonl")
    assert records[0]["image"] == [str(sub / "x.png")] * 2
    assert records[0]["_source"] == f"{sub / 'd.jsonl'}:1"
