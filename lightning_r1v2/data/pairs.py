"""Preference pairs for MPO: the JSONL format, its reader, the collator and the DataModule.

A pairs file (``cli.py build-pairs`` writes one) holds one pair per line: a record (``id``,
``image``, ``question``, ``answer``, ...) plus::

    {"pair_id"?, "chosen", "rejected", "chosen_reward"?, "rejected_reward"?, "gap"?,
     "ref_chosen_logp"?, "ref_rejected_logp"?}

``ref_*_logp`` are the reference policy's log-probs of each response (summed over its tokens,
end-of-turn included); when every pair has them, ``MPOModule(reference="precomputed")`` uses
them instead of computing its own. A bad pair is reported as ``file:line: reason``.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .collate import prompt_response_batch
from .datamodule import R1V2DataModule, RecordDataset, loader_generator
from .records import ReadReport
from .sources import read_source

log = logging.getLogger("lightning_r1v2.data")

NUMBER_FIELDS = ("chosen_reward", "rejected_reward", "gap", "ref_chosen_logp", "ref_rejected_logp")
REF_FIELDS = ("ref_chosen_logp", "ref_rejected_logp")


def validate_pair(rec: dict) -> tuple[str, str] | None:
    """``(kind, reason)`` when the pair fields of an already valid record are bad, else None.

    An empty response is valid (a policy that stops at once gives one; it is a fine rejected answer).
    """
    for key in ("chosen", "rejected"):
        if key not in rec or rec[key] is None:
            return "missing_field", f"missing field {key!r}"
        if not isinstance(rec[key], str):
            return "wrong_type", f"{key!r} must be a string, got {type(rec[key]).__name__}"
    if rec["chosen"] == rec["rejected"]:
        return "same_text", "'chosen' and 'rejected' are the same text"
    for key in NUMBER_FIELDS:
        v = rec.get(key)
        if v is None:
            continue
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return "wrong_type", f"{key!r} must be a finite number, got {v!r:.40}"
    if "pair_id" in rec and not isinstance(rec["pair_id"], (str, int)):
        return "wrong_type", f"'pair_id' must be a string or integer, got {type(rec['pair_id']).__name__}"
    return None


def read_pairs(path: str | Path, strict: bool = True, check_images: bool = True, format: str = "auto",
               columns: dict | None = None) -> tuple[list[dict], ReadReport]:
    """Read and validate a pairs file (JSONL, or any source of ``sources.read_source`` whose rows
    carry ``chosen`` / ``rejected``).

    Every line is first checked as a record by ``read_source`` (same ``file:line: reason``
    errors, images made absolute), then its pair fields by ``validate_pair``. Pairs without a
    ``pair_id`` get ``"<id>#<line>"``; a repeated ``pair_id`` is an error. Strict: the first bad
    line raises ``RecordError``; else bad lines are skipped and counted in the report.
    """
    records, report = read_source(path, format=format, columns=columns, strict=strict, check_images=check_images)
    pairs: list[dict] = []
    seen: dict[str, str] = {}
    for rec in records:
        problem = validate_pair(rec)
        if problem is None:
            line = rec["_source"].rsplit(":", 1)[1]
            rec["pair_id"] = str(rec.get("pair_id", f"{rec['id']}#{line}"))
            if rec["pair_id"] in seen:
                problem = ("duplicate_pair_id", f"pair_id {rec['pair_id']!r} repeats {seen[rec['pair_id']]}")
        if problem is not None:
            kind, reason = problem
            report.reject(kind, f"{rec['_source']}: {reason}", strict, what="pair")
            continue
        seen[rec["pair_id"]] = rec["_source"]
        pairs.append(rec)
    report.kept = len(pairs)
    return pairs, report


class PairCollator:
    """``B`` pairs -> one batch of ``2B`` sequences: rows ``0..B-1`` chosen, ``B..2B-1`` rejected.

    Each row is prompt + response + end-of-turn, right padded; ``labels`` hold the response
    tokens (end-of-turn included) and -100 on prompt, image and padding tokens, as
    ``SFTCollator``. ``media`` holds the ``B`` pairs' images twice, in row order.
    ``ref_chosen_logp`` / ``ref_rejected_logp`` (``[B]``) are added when every pair has them.
    """

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, pairs: list[dict]) -> dict:
        rows = list(pairs) + list(pairs)
        batch = prompt_response_batch(self.processor, rows, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
        batch["records"] = pairs
        batch["pair_ids"] = [p["pair_id"] for p in pairs]
        if all(p.get(k) is not None for p in pairs for k in REF_FIELDS):
            for k in REF_FIELDS:
                batch[k] = torch.tensor([float(p[k]) for p in pairs], dtype=torch.float32)  # [B]
        return batch


class PreferenceDataModule(R1V2DataModule):
    """Preference pairs for MPO training; ordinary records for held-out accuracy.

    Validation is ``R1V2DataModule``'s (prompts of ``val_file``, evaluated by generation).

    Args:
        train_file: Pairs JSONL (``cli.py build-pairs``).
        val_file: JSONL of held-out records (not pairs).
        batch_size: Pairs per training batch (the forward pass sees twice as many rows).
        eval_batch_size: Records per validation batch.
        max_prompt_tokens: Held-out prompts longer than this are skipped (pairs are not checked:
            they were sampled from prompts that already fit).
        strict: Stop at the first bad line (``file:line: reason``); else skip and count.
        max_train_pairs: Use only the first N pairs (0: all).
        max_val_records: Use only the first N held-out records (0: all).
        seed: Shuffling seed.
        num_workers: DataLoader workers.
        format: Source format of both files (``auto``: from each path; see ``R1V2DataModule``).
        columns: Dataset column names (see ``R1V2DataModule``).
        max_pixels: Scale larger images down before the processor (0: never).
        min_pixels: Scale smaller images up (0: never).
        allow_outside_paths: Held-out JSONL image paths may leave the file's folder (see ``R1V2DataModule``).
    """

    def __init__(
        self,
        train_file: str = "data/tiny/pairs.jsonl",
        val_file: str | None = "data/tiny/val.jsonl",
        batch_size: int = 16,
        eval_batch_size: int = 100,
        max_prompt_tokens: int = 256,
        strict: bool = True,
        max_train_pairs: int = 0,
        max_val_records: int = 0,
        seed: int = 0,
        num_workers: int = 0,
        format: str = "auto",
        columns: dict[str, str] | None = None,
        max_pixels: int = 0,
        min_pixels: int = 0,
        allow_outside_paths: bool = False,
    ):
        super().__init__(
            train_file=train_file, val_file=val_file, kind="prompts", batch_size=batch_size,
            eval_batch_size=eval_batch_size, max_prompt_tokens=max_prompt_tokens, strict=strict,
            max_train_records=max_train_pairs, max_val_records=max_val_records, seed=seed, num_workers=num_workers,
            format=format, columns=columns, max_pixels=max_pixels, min_pixels=min_pixels,
            allow_outside_paths=allow_outside_paths,
        )
        # the parent's hyperparameters that this signature names differently or fixes
        self.hparams.update(kind="prompts", max_train_records=max_train_pairs)

    def setup(self, stage: str | None = None):
        hp = self.hparams
        if stage in ("fit", None) and not self.train_records:
            pairs, report = read_pairs(hp.train_file, strict=hp.strict, format=hp.format, columns=hp.columns)
            self.skipped.update(report.skipped)
            self.train_records = pairs[: hp.max_train_pairs] if hp.max_train_pairs else pairs
            if hp.max_pixels or hp.min_pixels:
                for r in self.train_records:
                    r["_resize"] = [hp.min_pixels, hp.max_pixels]
            if not self.train_records:
                raise ValueError(f"{hp.train_file}: no usable preference pairs (run `cli.py build-pairs` first)")
            self._require_one_batch("preference pairs")
        if hp.val_file and not self.val_records and stage in ("fit", "validate", "test", None):
            self.val_records = self._load(hp.val_file, hp.max_val_records)
        if self.skipped:
            log.warning("skipped lines: %s", dict(self.skipped))

    def train_dataloader(self):
        hp = self.hparams
        return DataLoader(
            RecordDataset(self.train_records),
            batch_size=hp.batch_size,
            sampler=self._train_sampler(),
            collate_fn=PairCollator(self._processor()),
            drop_last=True,
            num_workers=hp.num_workers,
            generator=loader_generator(hp.seed),
        )
