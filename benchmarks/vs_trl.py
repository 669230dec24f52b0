"""Our ``GRPOModule`` against TRL's ``GRPOTrainer`` on the same tiny VLM, step for step.

Run: ``python benchmarks/vs_trl.py [--repeats 3] [--steps 10] [--warmup 2] [--threads 1]``
(needs TRL: ``pip install -e '.[bench]'``).

Both frameworks train the embedded tiny InternVL from the same weights (the SFT checkpoint
``runs/sft/checkpoints/last.ckpt`` when it exists, else the seed-0 random init), with the same
processor (``TinyVLProcessor``), the same prompts (the first records of ``data/tiny/train.jsonl``),
``--prompts`` x ``--group-size`` completions of at most ``--max-new-tokens`` tokens sampled at
temperature 1.0, the same rewards (0.8 accuracy + 0.2 format, weighted sum), group-scaled
advantages, the sequence-mean ("grpo") loss with clip 0.2, no KL and no reference model, one
optimizer step per rollout batch, constant learning rate, gradient clipping at 1.0.

Each measured run is its own subprocess (so peak RSS, ``ru_maxrss``, is per framework), runs
alternate (ours, TRL, TRL, ours, ...) so that drift of a shared machine hits both alike, and each
sets ``OMP_NUM_THREADS`` and ``torch.set_num_threads`` to ``--threads``. Measured per step:

- ``step``: wall time from one optimizer step's end to the next one's (data loading, prompt
  processing, generation, rewards, update, logging: everything a step costs; TRL does its
  prompt processing inside the step, we do it in the DataLoader's collate, so only this
  end-to-end interval compares like with like);
- ``step (hooks)``: between the framework's own step-begin and step-end hooks;
- ``generate``: time inside ``model.generate`` (wrapped on the model instance), and the
  completion tokens it produced (up to and including the first EOS), for rollout tokens/s.

The first ``--warmup`` steps of every run are not counted; medians pool the measured steps of
all runs. Not a test; TRL is not a dependency of the package.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_FILE = ROOT / "data/tiny/train.jsonl"
SFT_CKPT = ROOT / "runs/sft/checkpoints/last.ckpt"
RESULT_TAG = "VS_TRL_RESULT "
REWARD_WEIGHTS = {"accuracy": 0.8, "format": 0.2}  # R1V3's weighted hybrid reward
MISSING_TRL = (
    "TRL is not installed; this benchmark needs it (it is not a dependency of the package).\n"
    "Install the benchmark extra:  pip install -e '.[bench]'   (TRL >= 1.0; measured with trl==1.16.0)"
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="runs of each framework, alternating (default 3)")
    p.add_argument("--steps", type=int, default=10, help="measured steps per run (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="steps run first in every run and not counted (default 2)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step (default 4)")
    p.add_argument("--group-size", type=int, default=4, help="completions per prompt (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="longest completion (default 24)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate of both (default 3e-4, the tiny config's)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads in each run (default 1)")
    p.add_argument("--init-ckpt", default="auto",
                   help="policy weights: a lightning-r1v2 checkpoint, 'auto' (the SFT checkpoint if present) or 'none'")
    p.add_argument("--records", type=int, default=256, help="training records loaded (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10,
                   help="metrics logged every N steps by both (TRL logging_steps, ours log_every_n_steps; TRL's default 10)")
    p.add_argument("--only", choices=["ours", "trl"], default=None, help="run one framework only")
    p.add_argument("--json", default=None, help="also write every run's raw measurements to this file")
    p.add_argument("--ours-module", default="lightning_r1v2.modules.GRPOModule",
                   help="our module's class (dotted path), to measure a variant against TRL")
    p.add_argument("--ours-engine", default="lightning_r1v2.rollout.HFGenerateEngine",
                   help="our rollout engine's class (dotted path)")
    p.add_argument("--summarise", default=None, help="print the table of a --json file again, running nothing")
    p.add_argument("--worker", choices=["ours", "trl"], default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def init_ckpt(a) -> str | None:
    if a.init_ckpt == "none":
        return None
    if a.init_ckpt == "auto":
        return str(SFT_CKPT) if SFT_CKPT.exists() else None
    return a.init_ckpt


# ------------------------------------------------------------------ shared by both workers
class GenTimer:
    """Wraps ``model.generate`` on the instance: time spent and completion tokens produced."""

    def __init__(self, model, eos_id: int, pad_id: int):
        self.model, self.eos_id, self.pad_id = model, eos_id, pad_id
        self.seconds = 0.0
        self.tokens = 0
        self.calls = 0
        inner = model.generate

        def generate(*args, **kwargs):
            t = time.perf_counter()
            out = inner(*args, **kwargs)
            self.seconds += time.perf_counter() - t
            self.calls += 1
            ids = out if not hasattr(out, "sequences") else out.sequences
            P = kwargs["input_ids"].shape[1] if "input_ids" in kwargs else args[0].shape[1]
            self.tokens += _completion_tokens(ids[:, P:], eos_id)
            return out

        model.generate = generate

    def take(self) -> tuple[float, int]:
        s, n = self.seconds, self.tokens
        self.seconds, self.tokens = 0.0, 0
        return s, n


def _completion_tokens(completion_ids, eos_id: int) -> int:
    """Tokens up to and including the first EOS of each row (as our completion mask counts)."""
    is_eos = completion_ids == eos_id
    seen_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return int((~seen_before).sum())


class StepLog:
    """Per-step times: hook-to-hook, end-to-end (previous step end to this step end), generate."""

    def __init__(self, gen: GenTimer):
        self.gen = gen
        self.rows: list[dict] = []
        self._t0 = None
        self._t_prev_end = None

    def begin(self):
        self._t0 = time.perf_counter()
        self.gen.take()

    def end(self):
        now = time.perf_counter()
        gs, gt = self.gen.take()
        self.rows.append({
            "step_hooks": now - self._t0,
            "step": None if self._t_prev_end is None else now - self._t_prev_end,
            "generate": gs,
            "tokens": gt,
        })
        self._t_prev_end = now


def _rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _load_records(a) -> list[dict]:
    from lightning_r1v2.data.records import read_records

    records, _ = read_records(TRAIN_FILE)
    return records[: a.records]


# --------------------------------------------------------------------------------- ours
def run_ours(a) -> dict:
    import lightning as L
    import torch

    from lightning_r1v2.data.datamodule import R1V2DataModule
    from lightning_r1v2.rewards import RewardCallback, accuracy_reward, format_reward
    from lightning_r1v2.rewards.callback import import_object

    GRPOModule = import_object(a.ours_module)
    HFGenerateEngine = import_object(a.ours_engine)

    torch.set_num_threads(a.threads)
    L.seed_everything(a.seed, verbose=False)
    engine = HFGenerateEngine(max_new_tokens=a.max_new_tokens, temperature=a.temperature)
    module = GRPOModule(
        engine=engine, group_size=a.group_size, clip_eps=0.2, kl_coef=0.0, aggregation="sequence",
        scale_advantages=True, reward_mode="weighted", mini_batch_size=0, updates_per_batch=1,
        max_grad_norm=1.0, table_every_n_steps=0, model="tiny", trainable=["vision", "connector", "llm"],
        lr=a.lr, warmup_ratio=0.0, min_lr_ratio=1.0,  # constant LR, as TRL's "constant"
        init_ckpt=init_ckpt(a),
    )
    tok = module.tokenizer
    gen = GenTimer(module.model, tok.eos_token_id, tok.pad_token_id)
    log = StepLog(gen)

    class Timer(L.Callback):
        def on_train_start(self, trainer, pl_module):
            torch.set_num_threads(a.threads)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            log.begin()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            log.end()

    dm = R1V2DataModule(train_file=str(TRAIN_FILE), val_file=None, kind="prompts", batch_size=a.prompts,
                        max_train_records=a.records, seed=a.seed)
    rewards = [RewardCallback(accuracy_reward, name="accuracy", weight=REWARD_WEIGHTS["accuracy"]),
               RewardCallback(format_reward, name="format", weight=REWARD_WEIGHTS["format"])]
    trainer = L.Trainer(
        max_steps=a.warmup + a.steps, accelerator="cpu", devices=1, logger=False,
        log_every_n_steps=a.log_every,  # as TRL's logging_steps below
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[*rewards, Timer()],
    )
    rss_before = _rss_now_mb()
    trainer.fit(module, dm)
    return {"rows": log.rows, "rss_before_mb": rss_before, "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------- TRL
_TOKENIZER = None


def _texts(completion_ids) -> list[str]:
    """Completion texts WITH ``<think>``/``</think>`` (special tokens of the tiny tokenizer).

    TRL decodes ``completions`` with ``skip_special_tokens=True``, which drops the reasoning
    markers, so the format reward would always be 0: decode the ids as our engine does.
    """
    tok = _TOKENIZER
    drop = {tok.eos_token_id, tok.pad_token_id}
    return tok.batch_decode([[t for t in ids if t not in drop] for ids in completion_ids], skip_special_tokens=False)


def trl_accuracy(completions, completion_ids, answer, choices=None, **kwargs):
    from lightning_r1v2.rewards import accuracy_reward

    return accuracy_reward(_texts(completion_ids), answer=answer, choices=choices)


def trl_format(completions, completion_ids, **kwargs):
    from lightning_r1v2.rewards import format_reward

    return format_reward(_texts(completion_ids))


def run_trl(a) -> dict:
    global _TOKENIZER
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lightning_r1v2.data.collate import load_images
    from lightning_r1v2.models.tiny import build_processor, build_tiny_model
    from lightning_r1v2.models.weights import load_policy_weights

    torch.set_num_threads(a.threads)
    processor = build_processor()
    _TOKENIZER = processor.tokenizer
    model = build_tiny_model(tokenizer=processor.tokenizer, seed=0)
    ckpt = init_ckpt(a)
    if ckpt:
        load_policy_weights(model, ckpt)
    rows = []
    for r in _load_records(a):
        rows.append({
            "prompt": [{"role": "user", "content": r["question"]}],  # TRL puts the image entry first
            "image": load_images(r)[0],
            "answer": r["answer"],
            "choices": r.get("choices"),
            "type": r.get("type"),
        })
    dataset = Dataset.from_list(rows)
    out_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"vs_trl_{os.getpid()}"
    cfg = GRPOConfig(
        output_dir=str(out_dir), use_cpu=True, bf16=False, fp16=False, seed=a.seed, data_seed=a.seed,
        per_device_train_batch_size=a.prompts * a.group_size, gradient_accumulation_steps=1,
        num_generations=a.group_size, num_iterations=1, max_steps=a.warmup + a.steps,
        max_completion_length=a.max_new_tokens, temperature=a.temperature, top_p=1.0, top_k=0,
        learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0,
        beta=0.0, epsilon=0.2, loss_type="grpo", scale_rewards="group",
        reward_weights=[REWARD_WEIGHTS["accuracy"], REWARD_WEIGHTS["format"]],
        report_to="none", logging_steps=a.log_every, save_strategy="no", disable_tqdm=True, log_completions=False,
        remove_unused_columns=False, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[trl_accuracy, trl_format], args=cfg,
                          train_dataset=dataset, processing_class=processor)
    tok = processor.tokenizer
    gen = GenTimer(trainer.model, tok.eos_token_id, tok.pad_token_id)
    log = StepLog(gen)
    lengths = []

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            torch.set_num_threads(a.threads)

        def on_step_begin(self, args, state, control, **kw):
            log.begin()

        def on_step_end(self, args, state, control, **kw):
            log.end()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    trainer.add_callback(Timer())
    rss_before = _rss_now_mb()
    trainer.train()
    return {"rows": log.rows, "rss_before_mb": rss_before, "threads": torch.get_num_threads(),
            "trl_mean_length": lengths}


# ------------------------------------------------------------------------------- driver
def worker(a) -> None:
    t = time.perf_counter()
    res = run_ours(a) if a.worker == "ours" else run_trl(a)
    res["framework"] = a.worker
    res["peak_rss_mb"] = _peak_rss_mb()
    res["wall_s"] = time.perf_counter() - t
    print(RESULT_TAG + json.dumps(res), flush=True)


def _child_argv(a, framework: str) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", framework]
    for k in ("steps", "warmup", "prompts", "group_size", "max_new_tokens", "temperature", "lr", "threads",
              "init_ckpt", "records", "seed", "log_every", "ours_module", "ours_engine"):
        argv += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    return argv


def run_one(a, framework: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error")
    t = time.perf_counter()
    proc = subprocess.run(_child_argv(a, framework), env=env, cwd=ROOT, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"the {framework} run failed (exit {proc.returncode})")
    res = json.loads(lines[-1][len(RESULT_TAG):])
    res["process_wall_s"] = time.perf_counter() - t
    return res


def summarise(runs: list[dict], fw: str, warmup: int) -> dict | None:
    mine = [r for r in runs if r["framework"] == fw]
    if not mine:
        return None
    rows = [row for r in mine for row in r["rows"][warmup:]]
    steps = [row["step"] for row in rows if row["step"] is not None]
    return {
        "runs": len(mine),
        "steps": len(steps),
        "step": statistics.median(steps),
        "step_run_medians": [statistics.median([x["step"] for x in r["rows"][warmup:] if x["step"] is not None])
                             for r in mine],
        "step_hooks": statistics.median(row["step_hooks"] for row in rows),
        "generate": statistics.median(row["generate"] for row in rows),
        "tokens": statistics.median(row["tokens"] for row in rows),
        "tok_s": statistics.median(row["tokens"] / row["generate"] for row in rows if row["generate"] > 0),
        "step_tok_s": statistics.median(row["tokens"] / row["step"] for row in rows if row["step"]),
        "peak_rss": max(r["peak_rss_mb"] for r in mine),
        "rss_before": statistics.median(r["rss_before_mb"] for r in mine),
        "threads": sorted({r["threads"] for r in mine}),
        "process_wall": statistics.median(r["process_wall_s"] for r in mine),
    }


DIFFERENCES = """\
Differences (same maths; what each framework does around it):
- Behaviour log-probs: ours records log p(token) while sampling (a logits processor in
  generate: one log_softmax over the vocabulary per decoding step) and keeps them as the
  ratio's denominator; TRL with num_iterations=1 and steps aligned skips old log-probs entirely
  (ratio = exp(logp - logp.detach()) = 1). Neither runs an extra forward before the update;
  ours pays the per-step log_softmax + gather inside generate (it would matter with a large
  vocabulary; updates_per_batch > 1 uses it, TRL then runs a full extra forward instead).
- Reference model: neither keeps one here (ours builds it only when kl_coef > 0; TRL only when
  beta != 0).
- Blocked tokens: ours suppresses image start/end/context, video and pad tokens in sampling and
  masks the same ids to -inf in the training forward (so the recorded and recomputed
  distributions agree); TRL suppresses only config.image_token_id while sampling and scores the
  unmasked softmax in training.
- Completions: TRL decodes with skip_special_tokens=True (drops <think>/</think> of the tiny
  tokenizer) and hands conversational dicts to reward functions; for the same rewards the TRL
  side here decodes completion_ids itself (``trl_accuracy``/``trl_format`` above), as our engine does.
- Prompt processing: TRL applies the chat template and runs the processor inside the training
  step (from PIL images kept in a datasets.Dataset); ours does it in the DataLoader collate
  (images read from PNG files), outside the step hooks: compare the end-to-end step.
- Loss: both sequence-mean ("grpo"), clip 0.2, group-std-scaled advantages, token entropy
  computed in the update; TRL also gathers/logs clip ratios per region, ours logs clip fraction,
  ratio, entropy and reward statistics via self.log_dict. Both log every --log-every steps
  (TRL logging_steps, ours log_every_n_steps; no logger writes to disk). TRL gathers its metrics
  every step and averages them at log time; ours computes its metric dict every step but hands
  it to Lightning only on logging steps (Lightning writes the last value of a step metric at
  those steps anyway, and its self.log costs ~0.5 ms a key), so --log-every 1 costs us more.
- Sampling order: TRL's RepeatSampler and our StatefulRandomSampler shuffle the same records
  differently (same seed, different orders), so the prompts of step k differ; completion
  lengths are reported to show the workload is comparable.
- Prompts per group: TRL's sampler repeats each prompt G times, so its processor handles
  prompts x G images per step and it runs the vision tower and the prompt tokens G times per
  prompt, in generate's prefill and again in the training forward. Ours processes each prompt
  once, prefills it once in generate (KV cache repeated G times) and, in the update, runs each
  group's prompt and image once and reuses that cache (kept in the autograd graph) for the
  group's G completions: same log-probs and gradients (tests/test_shared_prompt.py).
- Optimizer: both fused AdamW (TRL's default adamw_torch_fused; ours torch.optim.AdamW(fused=True)).
- Framework overhead: Lightning's loop (manual optimization, callbacks, hooks) against HF
  Trainer + Accelerate (per-step metric gathering, logging, callbacks).
"""


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.worker:
        worker(a)
        return
    if a.only != "ours" and not a.summarise and importlib.util.find_spec("trl") is None:
        print(MISSING_TRL, file=sys.stderr)
        raise SystemExit(2)
    frameworks = [a.only] if a.only else ["ours", "trl"]
    runs = []
    if a.summarise:
        saved = json.loads(Path(a.summarise).read_text())
        runs = saved["runs"]
        a = argparse.Namespace(**{**vars(a), **saved["args"], "summarise": a.summarise, "json": None})
    for rep in range(0 if a.summarise else a.repeats):
        order = frameworks if rep % 2 == 0 else frameworks[::-1]
        for fw in order:
            res = run_one(a, fw)
            runs.append(res)
            measured = [x["step"] for x in res["rows"][a.warmup:] if x["step"] is not None]
            print(f"run {rep + 1}/{a.repeats} {fw:<4}: median step {statistics.median(measured):.3f} s "
                  f"over {len(measured)} steps, peak RSS {res['peak_rss_mb']:.0f} MB, "
                  f"process {res['process_wall_s']:.1f} s", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "runs": runs}, indent=1))
    ours, trl = summarise(runs, "ours", a.warmup), summarise(runs, "trl", a.warmup)
    ckpt = init_ckpt(a)
    import torch
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if importlib.util.find_spec("trl"):
        import trl as trl_pkg

        versions += f", trl {trl_pkg.__version__}"
    print(f"\ntiny VLM GRPO, ours vs TRL: {a.prompts} prompts x {a.group_size} completions, max_new_tokens "
          f"{a.max_new_tokens}, temperature {a.temperature}, init {ckpt or 'random (seed 0)'}, CPU, "
          f"{a.threads} thread(s) per run on {os.cpu_count()} cores; {a.repeats} run(s) each, alternating, "
          f"{a.steps} measured steps after {a.warmup} warm-up; metrics logged every {a.log_every} step(s); "
          f"{versions}\n")

    def cell(s, key, fmt):
        return fmt.format(s[key]) if s else "-"

    def ratio(key, fmt="{:.2f}"):
        return fmt.format(ours[key] / trl[key]) if ours and trl else ""

    table = [
        ("median step, end to end (s)", "step", "{:.3f}", True),
        ("median step, hook to hook (s)", "step_hooks", "{:.3f}", True),
        ("median generate time (s)", "generate", "{:.3f}", True),
        ("completion tokens per step", "tokens", "{:.0f}", True),
        ("rollout tokens/s (generate)", "tok_s", "{:.0f}", True),
        ("completion tokens/s (whole step)", "step_tok_s", "{:.0f}", True),
        ("peak RSS (MB)", "peak_rss", "{:.0f}", True),
        ("RSS before training (MB)", "rss_before", "{:.0f}", True),
    ]
    print("| | ours | TRL | ours/TRL |\n|---|---:|---:|---:|")
    for label, key, fmt, show_ratio in table:
        print(f"| {label} | {cell(ours, key, fmt)} | {cell(trl, key, fmt)} | {ratio(key) if show_ratio else ''} |")
    for name, s in (("ours", ours), ("TRL", trl)):
        if s:
            meds = ", ".join(f"{x:.3f}" for x in s["step_run_medians"])
            print(f"\n{name}: per-run median step (s): {meds}; torch threads {s['threads']}; "
                  f"median process wall {s['process_wall']:.1f} s")
    if trl:
        lens = [x for r in runs if r["framework"] == "trl" for x in r.get("trl_mean_length", [])[a.warmup:]]
        if lens:
            print(f"TRL's own completions/mean_length (median over measured steps): {statistics.median(lens):.1f}")
    if ours and trl:
        r = ours["step"] / trl["step"]
        print(f"\nours / TRL median step time: {r:.2f} (target <= 0.67): {'met' if r <= 0.67 else 'NOT met'}\n")
    print(DIFFERENCES)


if __name__ == "__main__":
    main()
