"""``cli.py prefilter``: drop prompts the policy always or never solves (R1V2's offline SSB use).

GRPO learns nothing from a group whose rewards are all equal (every advantage is 0). R1V2 used
its Selective Sample Buffer offline to drop such prompts from the pool before training; here
the policy samples ``k`` answers per prompt and only prompts with a pass rate strictly between
0 and 1 are kept.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..data.sources import check_source_args
from .sampling import (
    EmbeddedImages,
    build_reward_callbacks,
    default_report_path,
    load_policy_module,
    load_records,
    output_record,
    sample_groups,
    write_jsonl,
    write_report,
)


def prefilter(
    ckpt_path: str,
    data: str = "data/tiny/train.jsonl",
    out: str = "data/tiny/train.prefiltered.jsonl",
    k: int = 8,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 24,
    rewards: list[dict] | None = None,
    reward_mode: str = "weighted",
    pass_reward: str = "accuracy",
    pass_threshold: float = 0.5,
    batch_size: int = 16,
    seed: int = 0,
    limit: int = 0,
    report: str | None = None,
    progress_every: int = 5,
    format: str = "auto",
    columns: dict[str, str] | None = None,
) -> dict:
    """Keep the prompts whose pass rate over ``k`` samples is strictly between 0 and 1.

    Args:
        ckpt_path: The policy that will be trained (usually the GRPO stage's ``init_ckpt``): a
            Lightning checkpoint, ``tiny`` or a Hugging Face folder.
        data: Records to filter: a JSONL file, a ``save_to_disk`` folder, parquet/arrow files (a
            path or a glob) or LLaVA JSON.
        out: Kept records (JSONL; images relative to its folder, embedded images written as files
            in ``<out stem>.images/`` beside it).
        k: Samples per prompt (the GRPO group size is a good choice).
        temperature: Sampling temperature (as in GRPO).
        top_p: Nucleus sampling mass.
        max_new_tokens: Longest sampled answer.
        rewards: Reward callbacks as in a trainer config; None: 0.8 accuracy + 0.2 format.
        reward_mode: How the columns combine (only used when ``pass_reward`` is ``combined``).
        pass_reward: Column whose value decides a pass (``accuracy``), or ``combined`` for the
            combined reward.
        pass_threshold: A sample passes when that value is strictly above this.
        batch_size: Prompts per ``generate`` call.
        seed: Sampling seed.
        limit: Use only the first ``limit`` records (0: all).
        report: Report path (default: ``out`` with ``.report.json``).
        progress_every: Print progress every this many batches.
        format: ``auto`` (from the path), ``jsonl``, ``hf``, ``parquet``, ``arrow`` or ``llava``.
        columns: Dataset column names (``hf``/``parquet``/``arrow``): ``question_key``,
            ``answer_key``, ``image_key``, ``choices_key``, ``response_key``, ``id_key``
            (``sources.ColumnMap``), e.g. ``{question_key: problem, image_key: images}``.

    Returns:
        The report: prompts per pass count ``0..k``, kept, dropped all-pass, dropped all-fail.
    """
    t0 = time.perf_counter()
    if k < 2:
        raise ValueError(f"k must be >= 2 to tell mixed prompts apart, got {k}")
    check_source_args(format, columns)
    module = load_policy_module(ckpt_path)
    callbacks = build_reward_callbacks(rewards)
    names = [cb.name for cb in callbacks]
    if pass_reward != "combined" and pass_reward not in names:
        raise ValueError(f"pass_reward {pass_reward!r} is not one of the reward names {names} (or 'combined')")
    records = load_records(data, limit, format=format, columns=columns)
    out_dir = Path(out).parent
    embedded = EmbeddedImages.beside(out)
    histogram = {f"{i}/{k}": 0 for i in range(k + 1)}
    kept: list[dict] = []
    all_pass = all_fail = 0
    groups = sample_groups(
        module, records, k, callbacks, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
        reward_mode=reward_mode, batch_size=batch_size, seed=seed, progress="prefilter", progress_every=progress_every,
    )
    for g in groups:
        values = g.reward if pass_reward == "combined" else g.rewards[pass_reward]
        passes = sum(v > pass_threshold for v in values)  # NaN (not applicable) never passes
        histogram[f"{passes}/{k}"] += 1
        if passes == 0:
            all_fail += 1
        elif passes == k:
            all_pass += 1
        else:
            kept.append({**output_record(g.record, out_dir, embedded), "pass_rate": passes / k})
    write_jsonl(out, kept)
    n = len(records)
    rep = {
        "policy": str(ckpt_path),
        "data": str(data),
        "out": str(out),
        "prompts": n,
        "k": k,
        "pass_counts": histogram,
        "kept": len(kept),
        "dropped_all_pass": all_pass,
        "dropped_all_fail": all_fail,
        "kept_share": len(kept) / max(n, 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    report_path = Path(report) if report else default_report_path(out)
    write_report(report_path, rep)
    hist = " ".join(f"{key}:{v}" for key, v in histogram.items())
    print(
        f"prefilter: kept {len(kept)}/{n} prompts ({rep['kept_share']:.1%}); dropped {all_pass} all-pass, "
        f"{all_fail} all-fail; pass counts {hist}; {rep['seconds']}s\nprefilter: wrote {out} and {report_path}",
        flush=True,
    )
    return rep
