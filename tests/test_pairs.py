"""Preference pairs: the file format and its errors, the collator's rows and labels, the DataModule."""
import json

import pytest
import torch

from lightning_r1v2.data.collate import IGNORE_INDEX
from lightning_r1v2.data.pairs import PairCollator, PreferenceDataModule, read_pairs
from lightning_r1v2.data.records import RecordError, read_records


def write_pairs(tiny_data, path, n=4, **extra):
    """``n`` pairs next to ``tiny_data``'s images: the reference response vs. a wrong answer."""
    records, _ = read_records(tiny_data / "train.jsonl")
    rows = []
    for i, rec in enumerate(records[:n]):
        row = {k: rec[k] for k in ("id", "question", "answer")}
        row["image"] = rec["image_rel"]
        row.update(pair_id=f"{rec['id']}/0", chosen=rec["response"], rejected=f"<think> no </think> \\boxed{{x{i}}}")
        row.update(extra)
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_read_pairs_resolves_images_and_keeps_ids(tiny_data):
    path = tiny_data / "pairs_ok.jsonl"
    rows = write_pairs(tiny_data, path, n=3)
    pairs, report = read_pairs(path)
    assert report.kept == 3 and [p["pair_id"] for p in pairs] == [r["pair_id"] for r in rows]
    assert all(p["image"][0].startswith(str(tiny_data)) for p in pairs)  # made absolute, as read_records does
    assert pairs[0]["chosen"] == rows[0]["chosen"]


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"chosen": None}, "missing field 'chosen'"),
        ({"rejected": 3}, "'rejected' must be a string"),
        ({"rejected": "SAME"}, "are the same text"),
        ({"gap": "big"}, "'gap' must be a finite number"),
        ({"pair_id": "dup"}, "repeats"),
        ({"question": ""}, "'question' is empty"),  # record checks come from read_records
    ],
)
def test_bad_pairs_are_reported_with_file_and_line(tiny_data, tmp_path, change, reason):
    rows = write_pairs(tiny_data, tmp_path / "unused.jsonl", n=3)
    for r in rows:
        r["image"] = str(tiny_data / r["image"])
    bad = dict(rows[2], **change)
    if change.get("rejected") == "SAME":
        bad["rejected"] = bad["chosen"]
    if change.get("pair_id") == "dup":
        rows[0]["pair_id"] = "dup"
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [rows[0], rows[1], bad]))
    with pytest.raises(RecordError, match=rf"pairs.jsonl:3: .*{reason}"):
        read_pairs(path)
    pairs, report = read_pairs(path, strict=False)
    assert len(pairs) == 2 and report.total_skipped == 1


def test_missing_pair_id_gets_one_from_id_and_line(tiny_data, tmp_path):
    rows = write_pairs(tiny_data, tmp_path / "x.jsonl", n=2)
    for r in rows:
        r.pop("pair_id")
        r["image"] = str(tiny_data / r["image"])
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, _ = read_pairs(path)
    assert [p["pair_id"] for p in pairs] == [f"{rows[0]['id']}#1", f"{rows[1]['id']}#2"]


def test_pair_collator_rows_labels_and_images(tiny_data, processor):
    path = tiny_data / "pairs_collate.jsonl"
    write_pairs(tiny_data, path, n=3)
    pairs, _ = read_pairs(path)
    batch = PairCollator(processor)(pairs)
    tok = processor.tokenizer
    B = 3
    assert batch["input_ids"].shape[0] == 2 * B and batch["labels"].shape == batch["input_ids"].shape
    assert batch["pair_ids"] == [p["pair_id"] for p in pairs]
    pv = [m["pixel_values"] for m in batch["media"]]
    assert len(pv) == 2 * B and all(torch.equal(pv[i], pv[B + i]) for i in range(B))  # the same images for both halves
    for row in range(2 * B):
        pair = pairs[row % B]
        text = pair["chosen"] if row < B else pair["rejected"]
        resp = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        n_real = int(batch["attention_mask"][row].sum())
        start = n_real - len(resp)
        # the response (with its end-of-turn) is the last real tokens, and only it carries labels
        assert ids[start:n_real].tolist() == resp and labels[start:n_real].tolist() == resp
        assert (labels[:start] == IGNORE_INDEX).all() and (labels[n_real:] == IGNORE_INDEX).all()
        assert (ids[n_real:] == tok.pad_token_id).all() and batch["attention_mask"][row, :n_real].all()
        assert tok.context_image_token_id in ids[:start].tolist()
    # chosen and rejected rows of one pair share the prompt token for token
    n_prompt = [int(batch["attention_mask"][r].sum()) - int((batch["labels"][r] != IGNORE_INDEX).sum()) for r in range(2 * B)]
    for i in range(B):
        assert n_prompt[i] == n_prompt[B + i]
        assert torch.equal(batch["input_ids"][i, : n_prompt[i]], batch["input_ids"][B + i, : n_prompt[i]])
    assert "ref_chosen_logp" not in batch


def test_pair_collator_passes_stored_reference_logps(tiny_data, processor):
    path = tiny_data / "pairs_ref.jsonl"
    write_pairs(tiny_data, path, n=2, ref_chosen_logp=-1.5, ref_rejected_logp=-7.25)
    pairs, _ = read_pairs(path)
    batch = PairCollator(processor)(pairs)
    assert batch["ref_chosen_logp"].tolist() == [-1.5, -1.5] and batch["ref_rejected_logp"].tolist() == [-7.25] * 2


def test_preference_datamodule_batches_resume_and_validation(tiny_data, processor):
    path = tiny_data / "pairs_dm.jsonl"
    write_pairs(tiny_data, path, n=6)
    dm = PreferenceDataModule(train_file=str(path), val_file=str(tiny_data / "val.jsonl"), batch_size=2,
                              eval_batch_size=8, seed=3)
    dm.processor = processor
    dm.setup("fit")
    assert len(dm.train_records) == 6 and len(dm.val_records) == 16
    order = [b["pair_ids"] for b in dm.train_dataloader()]
    assert len(order) == 3 and all(len(ids) == 2 for ids in order)
    assert sorted(i for ids in order for i in ids) == sorted(p["pair_id"] for p in dm.train_records)
    # resume after one batch of the next epoch: the rest of that epoch comes next
    it = iter(dm.train_dataloader())
    first = next(it)["pair_ids"]
    state = dm.state_dict()
    dm2 = PreferenceDataModule(train_file=str(path), val_file=None, batch_size=2, seed=3)
    dm2.processor = processor
    dm2.setup("fit")
    dm2.load_state_dict(state)
    rest = [b["pair_ids"] for b in dm2.train_dataloader()]
    expected = [next(it)["pair_ids"] for _ in range(2)]
    assert rest == expected and first not in rest
    val = next(iter(dm.val_dataloader()))
    assert "labels" not in val and len(val["records"]) == 8  # held-out prompts, not pairs


def test_fewer_pairs_than_one_batch_is_an_error_not_an_empty_fit(tiny_data, tmp_path, processor):
    """Two pairs and batches of four: the loader would drop the short batch, MPO would train nothing
    and write no checkpoint (the demo's --quick once did); the data module says so instead."""
    path = tiny_data / "two_pairs.jsonl"  # beside the images the pairs name
    write_pairs(tiny_data, path, n=2)
    dm = PreferenceDataModule(train_file=str(path), val_file=None, batch_size=4)
    dm.processor = processor
    with pytest.raises(ValueError, match=r"two_pairs.jsonl: 2 usable preference pairs, fewer than one batch on each rank \(4;"):
        dm.setup("fit")
    ok = PreferenceDataModule(train_file=str(path), val_file=None, batch_size=2)
    ok.processor = processor
    ok.setup("fit")
    assert len(ok.train_records) == 2
