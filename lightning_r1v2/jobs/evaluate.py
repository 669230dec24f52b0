"""``cli.py evaluate``: a checkpoint's held-out accuracy, format and hallucination rates.

Batched greedy generation over held-out records (any source ``read_source`` reads); accuracy per
question type; the majority-answer baseline (the most common answer of each question type in a reference split,
by default the training file next to ``data``) for comparison.
"""
from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

from ..rewards.claims import rates as hallucination_rates
from ..data.collate import PromptCollator
from ..rewards.rules import held_out_scores


def majority_baseline(eval_records: list[dict], reference_records: list[dict]) -> float:
    """Accuracy of always answering the most common answer of the record's question type."""
    by_type: dict[str, Counter] = defaultdict(Counter)
    for r in reference_records:
        by_type[r.get("type", "all")][r["answer"]] += 1
    hits = 0
    for r in eval_records:
        common = by_type.get(r.get("type", "all"))
        hits += bool(common) and common.most_common(1)[0][0] == r["answer"]
    return hits / max(1, len(eval_records))


def default_reference(data: str | Path) -> Path:
    """``train`` beside ``data``, with its suffix: ``val.jsonl`` -> ``train.jsonl``, ``d/val`` -> ``d/train``."""
    data = Path(data)
    return data.with_name("train" + data.suffix)


def reference_source(path: Path, given: bool, format: str, columns: dict | None) -> tuple[str, dict | None]:
    """How to read the majority baseline's reference: the default one (``train`` beside ``data``)
    with ``data``'s ``format`` and ``columns``; one given by path in the format its name says, with
    ``columns`` only where that format takes them (a JSONL or LLaVA reference beside parquet data)."""
    if not given:
        return format, columns
    from ..data.sources import detect_format

    fmt = detect_format(path)
    return fmt, (columns if fmt in ("hf", "parquet", "arrow") else None)


@torch.no_grad()
def evaluate_module(module, records: list[dict], batch_size: int = 100, max_new_tokens: int = 32) -> dict:
    """Greedy-decode every record with ``module``'s policy; return the metrics and completions."""
    module.eval()
    collate = PromptCollator(module.processor)
    texts: list[str] = []
    for i in range(0, len(records), batch_size):
        batch = collate(records[i : i + batch_size])
        out = module.generate(batch, max_new_tokens)
        texts += out  # cut at the first stop token, padding dropped
    scores = held_out_scores(texts, records)
    by_type: dict[str, list[float]] = defaultdict(list)
    for r, a in zip(records, scores["accuracy"]):
        by_type[r.get("type", "all")].append(a)
    hall = hallucination_rates(texts, records)
    return {
        "accuracy": sum(scores["accuracy"]) / len(records),
        # multiple choice answered by its letter only (the option's text boxed instead counts as wrong)
        "accuracy_letter_only": sum(scores["accuracy_letter_only"]) / len(records),
        "format": sum(scores["format"]) / len(records),
        "hallucination": hall["contradiction_rate"],
        "claim_error_rate": hall["claim_error_rate"],
        "denial_rate": hall["denial_rate"],
        "accuracy_by_type": {k: sum(v) / len(v) for k, v in sorted(by_type.items())},
        "n": len(records),
        "completions": texts,
    }


def evaluate(
    ckpt_path: str,
    data: str = "data/tiny/val.jsonl",
    reference: str | None = None,
    out: str | None = None,
    batch_size: int = 100,
    max_new_tokens: int = 32,
    limit: int = 0,
    format: str = "auto",
    columns: dict[str, str] | None = None,
) -> dict:
    """Evaluate a checkpoint on held-out records and print the metrics.

    Args:
        ckpt_path: A ``.ckpt`` written by ``cli.py fit`` (any stage), a Hugging Face folder, or
            ``tiny`` for a random init.
        data: Held-out records: a JSONL file, a ``save_to_disk`` folder, parquet/arrow files (a
            path or a glob) or LLaVA JSON.
        reference: Records whose answers define the majority baseline (default: ``train`` beside
            ``data`` with its suffix, e.g. ``train.jsonl``, ``train.parquet`` or a ``train`` folder,
            if present, read with ``data``'s ``format`` and ``columns``; a path given here is read
            in the format its name says, with ``columns`` where that format takes them).
        out: Write the metrics (and completions) as JSON here.
        batch_size: Records per generation batch.
        max_new_tokens: Generation length.
        limit: Evaluate only the first N records (0: all).
        format: ``auto`` (from the path), ``jsonl``, ``hf``, ``parquet``, ``arrow`` or ``llava``.
        columns: Dataset column names (``hf``/``parquet``/``arrow``): ``question_key``,
            ``answer_key``, ``image_key``, ``choices_key``, ``response_key``, ``id_key``
            (``sources.ColumnMap``), e.g. ``{question_key: problem, image_key: images}``.
    """
    from ..data.sources import check_source_args
    from .sampling import load_policy_module, load_records

    t0 = time.perf_counter()
    check_source_args(format, columns)
    module = load_policy_module(ckpt_path)
    records = load_records(data, limit, format=format, columns=columns)
    metrics = evaluate_module(module, records, batch_size, max_new_tokens)
    ref_path = Path(reference) if reference else default_reference(data)
    if ref_path.exists():
        ref_format, ref_columns = reference_source(ref_path, bool(reference), format, columns)
        ref = load_records(str(ref_path), format=ref_format, columns=ref_columns, check_images=False)
        metrics["majority_baseline"] = majority_baseline(records, ref)
    metrics["seconds"] = time.perf_counter() - t0
    summary = {k: v for k, v in metrics.items() if k != "completions"}
    print(json.dumps(summary, indent=2))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(metrics, indent=2))
    return summary
