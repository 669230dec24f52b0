"""Where the time of one GRPO step goes, on the tiny GRPO config.

Run: ``python benchmarks/grpo_step.py [--steps 5] [--group-size 8] [--prompts 8] [--threads 1]``

Builds the module, engine and reward callbacks of ``configs/tiny/grpo.yaml`` (starting from
``runs/sft/checkpoints/last.ckpt`` when it exists, else from the random init), trains inside a
``Trainer`` for ``--warmup + --steps`` steps and prints, for each phase of a step, the median
over the measured steps (seconds and share of the step), then rollout tokens per second:

- ``data``: fetching and collating the batch (images, chat template, processor);
- ``generate``, ``reward``: the module's own ``phase_times`` (reward = reward callbacks, monitors,
  combination, advantages);
- ``update``, split by timing inside a subclass: ``logprob forward`` (``sequence_logprobs``),
  ``backward`` (``manual_backward``), ``clip grad`` (``clip_gradients``) and the rest
  (optimizer step, loss maths, stats);
- ``other``: what the step spends outside those (logging, hooks, the LR scheduler).

Not a test. ``--threads 1`` is the default: on a small shared CPU, two intra-op threads fighting
other processes made the tiny model up to 50x slower.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import lightning as L
import torch
import yaml

from lightning_r1v2.data.datamodule import R1V2DataModule
from lightning_r1v2.modules import GRPOModule
from lightning_r1v2.rewards.callback import import_object

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/tiny/grpo.yaml"
SFT_CKPT = ROOT / "runs/sft/checkpoints/last.ckpt"


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class TimedGRPO(GRPOModule):
    """``GRPOModule`` that adds up the time of its log-prob forwards, backward passes and clipping."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.timings: dict[str, float] = {}

    def _timed(self, key, fn, *args, **kwargs):
        _sync()
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        _sync()
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t
        return out

    def sequence_logprobs(self, model, rows, with_entropy=False):  # noqa: D102
        return self._timed("logprob_forward", super().sequence_logprobs, model, rows, with_entropy)

    def manual_backward(self, loss, *args, **kwargs):  # noqa: D102
        return self._timed("backward", super().manual_backward, loss, *args, **kwargs)

    def clip_gradients(self, *args, **kwargs):  # noqa: D102
        return self._timed("clip_grad", super().clip_gradients, *args, **kwargs)


class StepTimer(L.Callback):
    """Records the phases of every training step (``rows``: one dict per step)."""

    def __init__(self):
        self.rows: list[dict] = []
        self._t_end = None
        self._t_start = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        _sync()
        self._t_start = time.perf_counter()
        self._data = None if self._t_end is None else self._t_start - self._t_end
        pl_module.timings = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        _sync()
        self._t_end = time.perf_counter()
        total = self._t_end - self._t_start
        pt, tm = pl_module.phase_times, pl_module.timings
        r = pl_module.last_rollouts
        update = pt["time/update"]
        row = {
            "generate": pt["time/generate"],
            "reward": pt["time/reward"],
            "update": update,
            "update: logprob forward": tm.get("logprob_forward", 0.0),
            "update: backward": tm.get("backward", 0.0),
            "update: clip grad": tm.get("clip_grad", 0.0),
            "update: optimizer step + rest": update - sum(tm.values()),
            "other": total - pt["time/generate"] - pt["time/reward"] - update,
            "step (without data)": total,
            "tokens": float(r.completion_mask.sum()),
        }
        if self._data is not None:
            row["data"] = self._data
        self.rows.append(row)


def load_config(path: Path = CONFIG) -> dict:
    return yaml.safe_load(path.read_text())


def build_module(cfg: dict, group_size: int | None = None, max_new_tokens: int | None = None,
                 init_ckpt: str | None = "auto", cls=GRPOModule, **overrides) -> GRPOModule:
    """The config's GRPO module; ``init_ckpt="auto"``: the SFT checkpoint if present, else random init."""
    args = dict(cfg["model"]["init_args"])
    engine_cfg = args.pop("engine")
    engine_args = dict(engine_cfg.get("init_args", {}))
    if max_new_tokens:
        engine_args["max_new_tokens"] = max_new_tokens
    args["engine"] = import_object(engine_cfg["class_path"])(**engine_args)
    if group_size:
        args["group_size"] = group_size
    if init_ckpt == "auto":
        init_ckpt = str(SFT_CKPT) if SFT_CKPT.exists() else None
    args["init_ckpt"] = init_ckpt
    args.update(overrides)
    return cls(**args)


def reward_callbacks(cfg: dict) -> list:
    """The config's reward callbacks (its ``RewardCallback`` entries), freshly built."""
    out = []
    for c in cfg["trainer"]["callbacks"]:
        if c["class_path"].endswith("RewardCallback"):
            out.append(import_object(c["class_path"])(**c.get("init_args", {})))
    return out


def build_data(cfg: dict, prompts: int | None = None, val_file: str | None = None, **overrides) -> R1V2DataModule:
    args = dict(cfg["data"]["init_args"])
    args = {k: str(ROOT / v) if k in ("train_file", "val_file") and v else v for k, v in args.items()}
    if prompts:
        args["batch_size"] = prompts
    args["val_file"] = val_file
    args.update(overrides)
    return R1V2DataModule(**args)


def optimizer_steps_per_batch(m, dm: R1V2DataModule) -> int:
    """Optimizer steps GRPO takes per rollout batch (``trainer.max_steps`` counts these)."""
    return m.optimizer_steps_per_batch(dm.hparams.batch_size)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5, help="measured steps (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="steps run first and not counted (default 1)")
    p.add_argument("--group-size", type=int, default=None, help="completions per prompt (default: the config's, 8)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per step (default: the config's, 8)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="completion length (default: the config's, 24)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator (default cpu, as the config)")
    p.add_argument("--init-ckpt", default="auto", help="policy weights ('auto': the SFT checkpoint if present; 'none')")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    L.seed_everything(a.seed, verbose=False)
    cfg = load_config()
    init = None if a.init_ckpt == "none" else a.init_ckpt
    m = build_module(cfg, a.group_size, a.max_new_tokens, init, cls=TimedGRPO, table_every_n_steps=0)
    dm = build_data(cfg, a.prompts)
    timer = StepTimer()
    trainer = L.Trainer(  # max_steps counts optimizer steps, not rollout batches
        max_steps=(a.warmup + a.steps) * optimizer_steps_per_batch(m, dm), accelerator=a.accelerator, devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[*reward_callbacks(cfg), timer],
    )
    t0 = time.perf_counter()
    trainer.fit(m, dm)
    wall = time.perf_counter() - t0
    rows = timer.rows[a.warmup :]
    G, B = m.hparams.group_size, dm.hparams.batch_size
    print(f"\ntiny GRPO step: {B} prompts x {G} completions, max_new_tokens {m.engine.max_new_tokens}, "
          f"init {m.hparams.init_ckpt or 'random'}, {a.accelerator}, {torch.get_num_threads()} thread(s); "
          f"median over {len(rows)} steps after {a.warmup} warm-up (fit wall {wall:.1f} s)")
    keys = {k for r in rows for k in r}
    med = {k: statistics.median(r[k] for r in rows if k in r) for k in keys}
    total = med["step (without data)"]
    order = ["data", "generate", "reward", "update", "update: logprob forward", "update: backward",
             "update: clip grad", "update: optimizer step + rest", "other", "step (without data)"]
    for k in order:
        if k in med:
            share = "" if k == "data" else f"{100 * med[k] / total:6.1f} %"
            print(f"  {k:<32} {med[k] * 1000:9.1f} ms  {share}")
    gen_rates = [r["tokens"] / r["generate"] for r in rows]
    step_rates = [r["tokens"] / r["step (without data)"] for r in rows]
    print(f"  {'rollout tokens/s (generate)':<32} {statistics.median(gen_rates):9.0f}")
    print(f"  {'completion tokens/s (whole step)':<32} {statistics.median(step_rates):9.0f}")
    print(f"  {'completion tokens per step':<32} {statistics.median(r['tokens'] for r in rows):9.0f}")
    return rows


if __name__ == "__main__":
    main()
