"""Effective-sample share with and without the Selective Sample Buffer (R1V2, arXiv 2504.16656).

Run: ``python benchmarks/ssb.py [--steps 50] [--eval] [--capacity 512 --alpha 1 --refill-share 1 --max-age 8]``

Trains the tiny GRPO config twice from the same start (``runs/sft/checkpoints/last.ckpt``, else
the random init), with the same seed and the same prompt order: once with the config's reward
callbacks only (configs/tiny/grpo.yaml: 0.6 accuracy + 0.3 grounding + 0.1 format), once with a ``SelectiveSampleBuffer`` after them.
Prints, per step, the share of rows with a non-zero advantage ("effective samples"):
``effective_share`` is the batch's own share (before the buffer), ``ssb/effective_share_after``
the share of the batch the loss sees; then the means over the run, and with ``--eval`` the
held-out accuracy before training and after each run.

R1V2 reports the share falling from ~60% to under 40% without the buffer and staying above 60%
with it; the target here is a run mean >= 60% with the buffer. No logger, no checkpoints.
``--accuracy-only`` drops the format reward: groups then tie far more often (a harder case).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_step import (  # noqa: E402
    SFT_CKPT, build_data, build_module, load_config, optimizer_steps_per_batch, reward_callbacks,
)

from lightning_r1v2.callbacks.buffer import SelectiveSampleBuffer  # noqa: E402

TARGET = 0.60


class ShareRecorder(L.Callback):
    """Per step: the batch's own effective share, the share after the buffer, replay and reward."""

    def __init__(self):
        self.rows: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        before = float(m["effective_share"])
        self.rows.append({
            "before": before,
            "after": float(m.get("ssb/effective_share_after", before)),
            "replayed": float(m.get("ssb/replayed_share", 0.0)),
            "buffer": float(m.get("ssb/buffer_size", 0.0)),
            "reward": float(m["reward"]),
        })


def _trainer(steps: int, callbacks: list, accelerator: str) -> L.Trainer:
    return L.Trainer(
        max_steps=steps, accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
        log_every_n_steps=1,  # the recorder reads every step's metrics
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, callbacks=callbacks,
    )


def _accuracy(m, dm, accelerator: str) -> float:
    t = L.Trainer(accelerator=accelerator, devices=1, logger=False, enable_progress_bar=False,
                  enable_model_summary=False)
    return float(t.validate(m, dm, verbose=False)[0]["val/accuracy"])


def run(a, cfg: dict, buffer: SelectiveSampleBuffer | None, val_file: str | None):
    """One training run; returns the per-step rows, the held-out accuracy after it (or None), seconds."""
    L.seed_everything(a.seed, verbose=False)
    m = build_module(cfg, a.group_size, a.max_new_tokens, a.init_ckpt, table_every_n_steps=0)
    dm = build_data(cfg, a.prompts, val_file=val_file, max_val_records=a.eval_records)
    rewards = reward_callbacks(cfg)
    if a.accuracy_only:
        rewards = [r for r in rewards if r.name == "accuracy"]
        rewards[0].weight = 1.0
    rec = ShareRecorder()
    cbs = [*rewards, *([buffer] if buffer is not None else []), rec]
    t0 = time.perf_counter()
    _trainer(a.steps * optimizer_steps_per_batch(m, dm), cbs, a.accelerator).fit(m, dm)  # a.steps rollout batches
    seconds = time.perf_counter() - t0
    acc = _accuracy(m, dm, a.accelerator) if val_file else None
    return rec.rows, acc, seconds


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50, help="training steps per run (default 50)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per step (default: the config's, 8)")
    p.add_argument("--group-size", type=int, default=None, help="completions per prompt (default: the config's, 8)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="completion length (default: the config's, 24)")
    p.add_argument("--capacity", type=int, default=512, help="SSB capacity (default 512, the buffer's default)")
    p.add_argument("--alpha", type=float, default=1.0, help="SSB exponent of P(j) ~ |A_j|^alpha (default 1)")
    p.add_argument("--refill-share", type=float, default=1.0,
                   help="SSB share of zero-advantage rows replaced (default 1)")
    p.add_argument("--max-age", type=int, default=8, help="SSB max age in steps, 0: none (default 8)")
    p.add_argument("--accuracy-only", action="store_true", help="reward = accuracy only (no format reward)")
    p.add_argument("--eval", action="store_true", help="held-out accuracy before training and after each run")
    p.add_argument("--eval-records", type=int, default=200, help="held-out records for --eval (default 200)")
    p.add_argument("--init-ckpt", default="auto", help="policy weights ('auto': the SFT checkpoint if present; 'none')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--accelerator", default="cpu")
    a = p.parse_args(argv)
    a.init_ckpt = None if a.init_ckpt == "none" else a.init_ckpt
    torch.set_num_threads(a.threads)
    cfg = load_config()
    val_file = str(Path(cfg["data"]["init_args"]["val_file"])) if a.eval else None
    if val_file and not Path(val_file).is_absolute():
        val_file = str(Path(__file__).resolve().parents[1] / val_file)
    start = "SFT checkpoint" if (a.init_ckpt == "auto" and SFT_CKPT.exists()) or a.init_ckpt else "random init"

    acc0 = None
    if a.eval:
        L.seed_everything(a.seed, verbose=False)
        m0 = build_module(cfg, a.group_size, a.max_new_tokens, a.init_ckpt)
        dm0 = build_data(cfg, a.prompts, val_file=val_file, max_val_records=a.eval_records)
        acc0 = _accuracy(m0, dm0, a.accelerator)
    base, acc_base, t_base = run(a, cfg, None, val_file)
    ssb = SelectiveSampleBuffer(capacity=a.capacity, alpha=a.alpha, refill_share=a.refill_share,
                                max_age=a.max_age, seed=a.seed)
    buf, acc_buf, t_buf = run(a, cfg, ssb, val_file)

    print(f"\nSSB benchmark: start {start}, {a.steps} steps, seed {a.seed}, "
          f"reward {'accuracy' if a.accuracy_only else ' + '.join(f'{r.weight:g} {r.name}' for r in reward_callbacks(cfg))}; "
          f"SSB capacity {a.capacity}, alpha {a.alpha}, refill_share {a.refill_share}, max_age {a.max_age}")
    print(f"{'step':>4} | {'no SSB: share':>13} {'reward':>7} | {'SSB: before':>11} {'after':>6} "
          f"{'replayed':>8} {'buffer':>6} {'reward':>7}")
    for i, (b, s) in enumerate(zip(base, buf)):
        print(f"{i:>4} | {b['before']:>13.3f} {b['reward']:>7.3f} | {s['before']:>11.3f} {s['after']:>6.3f} "
              f"{s['replayed']:>8.3f} {s['buffer']:>6.0f} {s['reward']:>7.3f}")

    def mean(rows, k):
        return statistics.fmean(r[k] for r in rows)

    def tail(rows, k):  # last quarter of the run
        return statistics.fmean(r[k] for r in rows[-max(1, len(rows) // 4):])

    print(f"mean | {mean(base, 'before'):>13.3f} {mean(base, 'reward'):>7.3f} | {mean(buf, 'before'):>11.3f} "
          f"{mean(buf, 'after'):>6.3f} {mean(buf, 'replayed'):>8.3f} {'':>6} {mean(buf, 'reward'):>7.3f}")
    print(f"last quarter: no SSB {tail(base, 'before'):.3f}; SSB before {tail(buf, 'before'):.3f}, "
          f"after {tail(buf, 'after'):.3f}")
    ok = mean(buf, "after") >= TARGET
    print(f"target: mean effective share with the buffer >= {TARGET:.0%}: {mean(buf, 'after'):.1%} "
          f"({'met' if ok else 'NOT met'}); without it {mean(base, 'before'):.1%}")
    if a.eval:
        print(f"held-out accuracy ({a.eval_records} records, greedy): start {acc0:.3f}, "
              f"no SSB {acc_base:.3f}, SSB {acc_buf:.3f}")
    print(f"wall: no SSB {t_base:.1f} s, SSB {t_buf:.1f} s")
    return {"base": base, "ssb": buf, "acc": (acc0, acc_base, acc_buf), "target_met": ok}


if __name__ == "__main__":
    main()
