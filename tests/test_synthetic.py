import hashlib
import json
import random

from lightning_r1v2.data.synthetic import TaskConfig, draw_scene, make_data, make_question


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes(tmp_path):
    make_data(str(tmp_path / "a"), train=20, val=5, seed=7)
    make_data(str(tmp_path / "b"), train=20, val=5, seed=7)
    make_data(str(tmp_path / "c"), train=20, val=5, seed=8)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_answers_follow_from_annotations(tmp_path):
    make_data(str(tmp_path), train=200, val=0, seed=1, difficulty="medium")
    types = set()
    for line in (tmp_path / "train.jsonl").read_text().splitlines():
        r = json.loads(line)
        counts = r["annotations"]["counts"]
        assert sum(counts.values()) == len(r["annotations"]["objects"])
        types.add(r["type"])
        q = r["question"]
        if r["type"] == "count":
            colour = q.split()[2]
            assert r["answer"] == str(counts[colour])
        elif r["type"] == "most":
            assert counts[r["answer"]] == max(counts.values())
            assert sorted(counts.values()).count(max(counts.values())) == 1
        elif r["type"] == "compare":
            a, b = q.split()[3], q.split()[5]
            assert r["answer"] == ("yes" if counts[a] > counts[b] else "no")
        else:
            colour = q.split()[2]
            assert r["choices"]["ABCD".index(r["answer"])] == str(counts[colour])
        assert r["response"].endswith("\\boxed{" + r["answer"] + "}")
    assert types == {"count", "most", "compare", "choice"}


def test_difficulty_presets_and_errors():
    assert TaskConfig("easy").colours == ("red", "green", "blue")
    assert TaskConfig("easy").grid == 2 and TaskConfig("easy").image_size == 32
    assert TaskConfig("hard").grid == 3 and TaskConfig("hard").image_size == 48
    import pytest

    with pytest.raises(ValueError, match="difficulty"):
        TaskConfig("impossible")
    rng = random.Random(0)
    img, ann = draw_scene(rng, TaskConfig("easy"))
    assert img.size == (32, 32) and ann["grid"] == 2
    # the colour of each annotated object is really drawn at its cell's centre
    from lightning_r1v2.data.synthetic import PALETTE

    for o in ann["objects"]:
        cx, cy = o["col"] * 16 + 8, o["row"] * 16 + 10
        assert img.getpixel((cx, cy)) == PALETTE[o["colour"]]
    assert make_question(random.Random(0), TaskConfig("easy", question_types=("count",)), ann["counts"])["type"] == "count"
