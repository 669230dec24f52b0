"""``cli.py build-pairs``: preference pairs for MPO by sampling the current policy (R1V2 stage 2).

For each question: sample ``N`` answers at temperature 1.0, score them with the reward callbacks
(default 0.8 accuracy + 0.2 format), and pair every chosen answer ``c`` with every rejected
answer ``r`` whose reward gap ``reward(c) - reward(r)`` is at least ``threshold`` (R1V2's
"MPO threshold", read as the minimum reward gap). Identical texts are kept once; at most
``max_pairs_per_question`` pairs are kept, largest gap first.

Running it again on the MPO checkpoint gives the next round of iterative MPO.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

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


def select_pairs(completions: list[str], rewards: list[float], threshold: float, max_pairs: int) -> list[tuple[int, int, float]]:
    """Pairs ``(chosen index, rejected index, gap)`` of one question's samples.

    Identical texts count once (the first sample stands for them). Every ordered pair with
    ``rewards[c] - rewards[r] >= threshold`` qualifies; the ``max_pairs`` with the largest gap
    are kept (0: no cap). Ties are broken deterministically so that the kept pairs spread over
    the distinct answers: by ``max(rank_c, rank_r)``, then ``rank_c``, then ``rank_r``, with
    ranks the answers' order of first appearance among the qualifying chosen / rejected texts.

    Example: rewards [1, 0, 1, 0.2], threshold 0.5 -> chosen {0, 2}, rejected {1, 3}, all 4 pairs,
    gaps 1.0 first: (0, 1), (2, 1), then 0.8: (0, 3), (2, 3).
    """
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0 (a pair needs a better and a worse answer), got {threshold}")
    seen: dict[str, int] = {}
    for i, text in enumerate(completions):
        seen.setdefault(text, i)
    unique = sorted(seen.values())
    cands = [(c, r, rewards[c] - rewards[r]) for c in unique for r in unique if rewards[c] - rewards[r] >= threshold - 1e-9]
    rank_c = {c: k for k, c in enumerate(dict.fromkeys(c for c, _, _ in cands))}
    rank_r = {r: k for k, r in enumerate(dict.fromkeys(r for _, r, _ in cands))}
    cands.sort(key=lambda t: (-round(t[2], 9), max(rank_c[t[0]], rank_r[t[1]]), rank_c[t[0]], rank_r[t[1]]))
    return cands[:max_pairs] if max_pairs else cands


@torch.no_grad()
def reference_logps(module, pairs: list[dict], batch_size: int = 64) -> list[tuple[float, float]]:
    """``(log pi(chosen), log pi(rejected))`` of each pair under ``module``'s policy, summed over tokens."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from ..data.pairs import PairCollator
    from ..modules.mpo import response_logprobs

    collate = PairCollator(module.processor)
    model = module.model.eval()
    out: list[tuple[float, float]] = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        logp, _ = response_logprobs(model, move_data_to_device(collate(chunk), module.device), module.processor)  # [2B]
        B = len(chunk)
        out.extend((float(logp[j]), float(logp[B + j])) for j in range(B))
    return out


def build_pairs(
    ckpt_path: str,
    data: str = "data/tiny/train.jsonl",
    out: str = "data/tiny/pairs.jsonl",
    num_samples: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 24,
    threshold: float = 0.5,
    max_pairs_per_question: int = 15,
    rewards: list[dict] | None = None,
    reward_mode: str = "weighted",
    correct_reward: str = "accuracy",
    batch_size: int = 16,
    seed: int = 0,
    limit: int = 0,
    report: str | None = None,
    progress_every: int = 5,
    store_ref_logps: bool = False,
    ref_batch_size: int = 64,
    format: str = "auto",
    columns: dict[str, str] | None = None,
) -> dict:
    """Sample the policy and write MPO preference pairs (JSONL) plus a report (JSON).

    Args:
        ckpt_path: The policy: a Lightning checkpoint (``runs/sft/checkpoints/last.ckpt``), ``tiny``
            or a Hugging Face folder. For the next round of iterative MPO, the MPO checkpoint.
        data: Records to sample: a JSONL file, a ``save_to_disk`` folder, parquet/arrow files (a
            path or a glob) or LLaVA JSON.
        out: Pairs file (JSONL); images are written relative to its folder, embedded images as
            files in ``<out stem>.images/`` beside it.
        num_samples: Answers sampled per question (InternVL MPO: up to 32).
        temperature: Sampling temperature (1.0 in InternVL MPO).
        top_p: Nucleus sampling mass (1.0: off).
        max_new_tokens: Longest sampled answer.
        threshold: Minimum reward gap ``reward(chosen) - reward(rejected)`` of a pair (R1V2's
            "MPO threshold"); with 0.8 accuracy + 0.2 format, 0.5 means "correct vs wrong".
        max_pairs_per_question: Cap on pairs per question, largest gap first (InternVL: 15; 0: none).
        rewards: Reward callbacks as in a trainer config (``class_path`` + ``init_args``);
            None: 0.8 accuracy + 0.2 format, as ``configs/tiny/grpo.yaml``.
        reward_mode: ``weighted``, ``sum`` or ``gate`` (``combine_rewards``).
        correct_reward: Reward column counted as "correct" (> 0.5) in the report; absent: not reported.
        batch_size: Questions per ``generate`` call.
        seed: Sampling seed.
        limit: Use only the first ``limit`` records (0: all).
        report: Report path (default: ``out`` with ``.report.json``).
        progress_every: Print progress every this many batches.
        store_ref_logps: Also score each pair under the sampling policy and write
            ``ref_chosen_logp`` / ``ref_rejected_logp`` / ``ref_policy``: an MPO run with
            ``reference: precomputed`` and ``init_ckpt`` = ``ckpt_path`` then reads them instead
            of scoring the pairs itself (a different ``init_ckpt`` scores them again).
        ref_batch_size: Pairs per forward pass for ``store_ref_logps``.
        format: ``auto`` (from the path), ``jsonl``, ``hf``, ``parquet``, ``arrow`` or ``llava``.
        columns: Dataset column names (``hf``/``parquet``/``arrow``): ``question_key``,
            ``answer_key``, ``image_key``, ``choices_key``, ``response_key``, ``id_key``
            (``sources.ColumnMap``), e.g. ``{question_key: problem, image_key: images}``.

    Returns:
        The report: questions, questions without a pair, pairs, pairs per question, mean gap,
        share of samples correct, time.
    """
    t0 = time.perf_counter()
    check_source_args(format, columns)
    module = load_policy_module(ckpt_path)
    callbacks = build_reward_callbacks(rewards)
    records = load_records(data, limit, format=format, columns=columns)
    out_dir = Path(out).parent
    embedded = EmbeddedImages.beside(out)
    rows: list[dict] = []
    to_score: list[dict] = []  # the rows with absolute image paths, for store_ref_logps
    per_question: list[int] = []
    gaps: list[float] = []
    n_samples = n_correct = n_unique = 0
    mean_reward = 0.0
    groups = sample_groups(
        module, records, num_samples, callbacks, temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens, reward_mode=reward_mode, batch_size=batch_size, seed=seed,
        progress="build-pairs", progress_every=progress_every,
    )
    for g in groups:
        pairs = select_pairs(g.completions, g.reward, threshold, max_pairs_per_question)
        base = output_record(g.record, out_dir, embedded)
        base.pop("response", None)  # the SFT target is not a sample of this policy
        for k, (c, r, gap) in enumerate(pairs):
            if store_ref_logps:
                to_score.append({**g.record, "pair_id": f"{g.record['id']}/{k}",
                                 "chosen": g.completions[c], "rejected": g.completions[r]})
            rows.append({
                **base,
                "pair_id": f"{g.record['id']}/{k}",
                "chosen": g.completions[c],
                "rejected": g.completions[r],
                "chosen_reward": round(g.reward[c], 6),
                "rejected_reward": round(g.reward[r], 6),
                "gap": round(gap, 6),
            })
            gaps.append(gap)
        per_question.append(len(pairs))
        n_samples += len(g.completions)
        n_unique += len(set(g.completions))
        mean_reward += sum(g.reward)
        if correct_reward in g.rewards:
            n_correct += sum(v > 0.5 for v in g.rewards[correct_reward])
    if store_ref_logps and rows:
        for row, (lc, lr) in zip(rows, reference_logps(module, to_score, ref_batch_size)):
            row.update(ref_chosen_logp=lc, ref_rejected_logp=lr, ref_policy=str(ckpt_path))
    write_jsonl(out, rows)
    q = len(per_question)
    rep = {
        "policy": str(ckpt_path),
        "data": str(data),
        "out": str(out),
        "questions": q,
        "questions_without_pair": sum(n == 0 for n in per_question),
        "pairs": len(rows),
        "pairs_per_question_mean": len(rows) / max(q, 1),
        "pairs_per_question_max": max(per_question, default=0),
        "mean_gap": sum(gaps) / max(len(gaps), 1),
        "samples": n_samples,
        "unique_samples_per_question": n_unique / max(q, 1),
        "mean_reward": mean_reward / max(n_samples, 1),
        "share_correct": (n_correct / max(n_samples, 1)) if any(cb.name == correct_reward for cb in callbacks) else None,
        "num_samples": num_samples,
        "threshold": threshold,
        "max_pairs_per_question": max_pairs_per_question,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    report_path = Path(report) if report else default_report_path(out)
    write_report(report_path, rep)
    share = f"{rep['share_correct']:.1%}" if rep["share_correct"] is not None else "n/a"
    print(
        f"build-pairs: {rep['pairs']} pairs from {q} questions ({rep['questions_without_pair']} without a pair); "
        f"pairs/question mean {rep['pairs_per_question_mean']:.2f} max {rep['pairs_per_question_max']}; "
        f"mean gap {rep['mean_gap']:.3f}; samples correct {share}; {rep['seconds']}s\n"
        f"build-pairs: wrote {out} and {report_path}",
        flush=True,
    )
    return rep
