"""GRPO step time, memory, rollout throughput and update MFU of the tiny GRPO config, per precision/strategy.

Run on one GPU:   ``python benchmarks/gpu_step.py [--steps 5] [--prompts 8] [--group-size 8] [--peak-tflops 989]``
Smoke test here:  ``python benchmarks/gpu_step.py --device cpu --steps 1 --prompts 2 --group-size 2``

Builds the module and reward callbacks of ``configs/tiny/grpo.yaml`` as ``benchmarks/grpo_step.py``
does (random init by default, so a bare GPU machine needs no earlier stage; ``--init-ckpt`` to
start from a checkpoint), on its own synthetic data (``make_data`` into a temporary folder), and
trains ``--warmup + --steps`` rollout batches inside a ``Trainer`` for each variant:

- ``a``: one GPU, ``precision=--precision`` (default ``bf16-true``: bf16 weights and AdamW states,
  no fp32 master copy; ``bf16-mixed`` keeps fp32 weights and autocasts), the module's own
  gradient clipping (``max_grad_norm`` 1.0);
- ``b``: one GPU, ``strategy=DeepSpeedStrategy(stage=2)`` with the same precision (DeepSpeed keeps
  fp32 master weights in its optimizer), clipping at 1.0 by DeepSpeed's ``gradient_clipping``
  (``self.clip_gradients`` is a no-op under DeepSpeed, docs/scale.md trap 1).

With ``--device cpu`` only variant ``a`` runs, in fp32 (``32-true``): Lightning's DeepSpeed
strategy refuses a CPU accelerator (``DeepSpeedStrategy.setup_environment``), so ``b`` is skipped
with that reason.

Printed per variant, as medians over the measured rollout batches (one rollout batch = one
``training_step`` = generation, rewards and ``updates_per_batch`` optimizer steps):

- ``step s``: the whole ``training_step`` (batch start to batch end, data loading excluded);
- ``generate s`` / ``update s``: ``module.phase_times["time/generate"]`` / ``["time/update"]``
  (update: log-prob forwards, backward passes, optimizer steps over the rollout batch);
- ``peak mem GB``: ``torch.cuda.max_memory_allocated()`` over the variant (reset before it); on a
  CPU the process's peak resident memory (``ru_maxrss``), which is not reset between variants;
- ``rollout tok/s``: generated (completion) tokens / generate time;
- ``update tok``: tokens the update's forwards and backwards see, ``T_update = updates_per_batch x
  (prompt tokens + completion tokens)``, padding excluded, each group's prompt counted once when
  ``share_prompt_forward`` reuses it;
- ``update TFLOP/s`` and ``MFU %``: ``(2 x N + 4 x N_trainable) x T_update / update s`` (forward
  through all ``N`` parameters, backward through the trainable ones; ``6 x N x T_update`` when all
  train; the tiny config freezes the vision tower, which the formula leaves out of the backward;
  an approximation: the backward of a frozen layer between trainable ones is not free), as a share of
  ``--peak-tflops`` (989: H100 SXM dense bf16; 756 for H100 PCIe; on a CPU the number only shows
  the column works).

Not a test (``tests/test_gpu_step.py`` runs the CPU smoke test). What to report from a GPU run:
docs/scale.md, "Measuring a GRPO step on one GPU".
"""
from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # grpo_step; this checkout's package, not an installed one
from grpo_step import build_data, build_module, load_config, optimizer_steps_per_batch, reward_callbacks  # noqa: E402

from lightning_r1v2.models.loading import param_numel  # noqa: E402

COLUMNS = ["variant", "precision", "step s", "generate s", "update s", "peak mem GB", "rollout tok/s",
           "update tok", "update TFLOP/s", "MFU %"]
FORMULA = ("MFU = (2 x N + 4 x N_trainable) x T_update / (update s x peak) (= 6 x N x T_update when all train); "
           "N = all policy parameters, T_update = updates_per_batch x (prompt + completion tokens)")


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepStats(L.Callback):
    """One dict per rollout batch: step, generate and update times, token counts.

    On a module without rollouts (SFT, MPO) the whole step counts as update, and the update's
    tokens are the batch's real tokens (``attention_mask.sum()``); ``benchmarks/gpu_check.py``
    adds it to a config's callbacks as ``--trainer.callbacks+=gpu_step.StepStats``.
    """

    def __init__(self):
        self.rows: list[dict] = []
        self._t = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        _sync()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        _sync()
        step = time.perf_counter() - self._t
        if getattr(pl_module, "last_rollouts", None) is None:  # SFT / MPO: the whole step is the update
            mask = batch.get("attention_mask") if isinstance(batch, dict) else None  # [B, T]
            self.rows.append({"step": step, "generate": 0.0, "update": step, "rollout_tokens": 0.0,
                              "update_tokens": float(mask.sum()) if mask is not None else 0.0})
            return
        pt, r = pl_module.phase_times, pl_module.last_rollouts
        G = pl_module.hparams.group_size
        prompt = float(r.prompt_mask.sum())  # [N, P] -> real prompt tokens (image tokens included)
        if pl_module.hparams.get("share_prompt_forward", False):
            prompt /= G  # each group's prompt goes through the update once
        completion = float(r.completion_mask.sum())  # [N, C] -> generated tokens up to EOS
        self.rows.append({
            "step": step,
            "generate": pt["time/generate"],
            "update": pt["time/update"],
            "rollout_tokens": completion,
            "update_tokens": pl_module.hparams.updates_per_batch * (prompt + completion),
        })


def run_variant(name: str, args, cfg: dict, train_file: str, device: str, precision: str, strategy,
                module_overrides: dict | None = None, data_overrides: dict | None = None) -> dict:
    """Fit ``--warmup + --steps`` rollout batches under one precision/strategy; return the medians.

    ``module_overrides`` / ``data_overrides``: ``GRPOModule`` / ``R1V2DataModule`` arguments set
    over the config's (``benchmarks/gpu_check.py``: a model folder, an engine, a prompt limit).
    """
    L.seed_everything(args.seed, verbose=False)
    init = None if args.init_ckpt == "none" else args.init_ckpt
    overrides = {"table_every_n_steps": 0}
    if strategy is not None:
        overrides["max_grad_norm"] = 0.0  # DeepSpeed clips (its config below); clip_gradients is a no-op there
    overrides.update(module_overrides or {})
    module = build_module(cfg, args.group_size, args.max_new_tokens, init, **overrides)
    dm = build_data(cfg, args.prompts, val_file=None, train_file=train_file, **(data_overrides or {}))
    stats = StepStats()
    batches = args.warmup + args.steps
    rows = dm.hparams.batch_size * module.hparams.group_size
    trainer = L.Trainer(
        max_steps=batches * optimizer_steps_per_batch(module, dm),
        accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=precision,
        strategy=strategy if strategy is not None else "auto",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[*reward_callbacks(cfg), stats],
    )
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, dm)
    if len(stats.rows) != batches:
        raise RuntimeError(f"variant {name}: ran {len(stats.rows)} rollout batches, expected {batches}")
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _rss_bytes()
    n_params, n_trainable = parameter_counts(module.model)
    out = {
        "variant": name,
        "precision": precision,
        "peak mem GB": peak / 1e9,
        **summarize(stats.rows[args.warmup:], n_params, n_trainable, args.peak_tflops),
        "_params": n_params,
        "_trainable": n_trainable,
        "_rows": rows,
    }
    del trainer, module, dm
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def parameter_counts(model) -> tuple[int, int]:
    """``(N, N_trainable)``: full parameter counts, ZeRO-3 partitioned or not."""
    n_params = sum(param_numel(p) for p in model.parameters())
    n_trainable = sum(param_numel(p) for p in model.parameters() if p.requires_grad)
    return n_params, n_trainable


def summarize(rows: list[dict], n_params: int, n_trainable: int, peak_tflops: float) -> dict:
    """Medians of ``StepStats`` rows, rollout tokens/s, and the update's TFLOP/s and MFU (module docstring)."""
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    flops = (2 * n_params + 4 * n_trainable) * med["update_tokens"]  # forward all, backward the trainable
    rates = [r["rollout_tokens"] / r["generate"] for r in rows if r["generate"] > 0]
    return {
        "step s": med["step"],
        "generate s": med["generate"],
        "update s": med["update"],
        "rollout tok/s": statistics.median(rates) if rates else 0.0,
        "update tok": med["update_tokens"],
        "update TFLOP/s": flops / med["update"] / 1e12,
        "MFU %": 100 * flops / med["update"] / (peak_tflops * 1e12),
    }


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def deepspeed_strategy(stage: int = 2):
    """``DeepSpeedStrategy(stage=stage)`` clipping at 1.0 (Lightning fills ``gradient_clipping`` only when missing)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = DeepSpeedStrategy(stage=stage)
    strategy.config["gradient_clipping"] = 1.0
    return strategy


def _fmt(key: str, v) -> str:
    if isinstance(v, str):
        return v
    if key in ("rollout tok/s", "update tok"):
        return f"{v:.0f}"
    if key in ("MFU %", "update TFLOP/s"):
        return f"{v:.3g}"
    return f"{v:.3f}"


def print_table(results: list[dict], skipped: list[tuple[str, str]], args, device: str) -> None:
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in results:
        print("| " + " | ".join(_fmt(k, r[k]) for k in COLUMNS) + " |")
    for name, why in skipped:
        print(f"variant {name} skipped: {why}")
    if results:
        r = results[0]
        print(f"{FORMULA}; N = {r['_params']:,} ({r['_trainable']:,} trainable); peak = {args.peak_tflops:g} TFLOP/s "
              f"(--peak-tflops)")
        mem = "torch.cuda.max_memory_allocated" if device == "cuda" else "process peak RSS (ru_maxrss, not reset)"
        print(f"peak mem: {mem}; medians over {args.steps} rollout batch(es) after {args.warmup} warm-up, "
              f"{args.prompts} prompts x {args.group_size} completions = {r['_rows']} rows, "
              f"max_new_tokens {args.max_new_tokens}, init {args.init_ckpt}")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cuda (default) or cpu (smoke test)")
    p.add_argument("--steps", type=int, default=5, help="measured rollout batches (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="rollout batches run first and not counted (default 1)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per rollout batch (default 8)")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="completion length (default 24, the config's)")
    p.add_argument("--precision", default="bf16-true", choices=["bf16-true", "bf16-mixed"],
                   help="GPU precision of both variants (default bf16-true); the CPU smoke test uses 32-true")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="peak dense bf16 TFLOP/s of the GPU for MFU (default 989: H100 SXM)")
    p.add_argument("--variants", default="a,b", help="which variants to run (default a,b)")
    p.add_argument("--init-ckpt", default="none", help="policy weights: 'none' (random init, default), 'auto' or a .ckpt")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.steps < 1 or a.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible (use --device cpu for the smoke test)")
    torch.set_num_threads(a.threads)
    cfg = load_config()
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = set(variants) - {"a", "b"}
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)} (a: plain precision, b: DeepSpeed ZeRO-2)")
    results, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="gpu_step_data_") as tmp:
        from lightning_r1v2.data.synthetic import make_data

        n_train = a.prompts * (a.warmup + a.steps) + a.prompts  # every batch full (drop_last), one spare
        make_data(tmp, train=n_train, val=1, seed=a.seed, difficulty="easy")
        train_file = str(Path(tmp) / "train.jsonl")
        for v in variants:
            if v == "a":
                precision = a.precision if a.device == "cuda" else "32-true"
                results.append(run_variant("a: 1 GPU" if a.device == "cuda" else "a: CPU", a, cfg, train_file,
                                           a.device, precision, None))
            elif a.device != "cuda":
                skipped.append(("b (deepspeed_stage_2)", "Lightning's DeepSpeedStrategy runs only on CUDA GPUs "
                                "(DeepSpeedStrategy.setup_environment refuses the CPUAccelerator)"))
            else:
                try:
                    strategy = deepspeed_strategy(stage=2)
                except ImportError as e:
                    skipped.append(("b (deepspeed_stage_2)", f"deepspeed is not importable: {e}"))
                    continue
                results.append(run_variant("b: 1 GPU deepspeed_stage_2", a, cfg, train_file, a.device,
                                           a.precision, strategy))
    print()
    print_table(results, skipped, a, a.device)
    return results


if __name__ == "__main__":
    main()
