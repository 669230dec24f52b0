"""The first command to run on a GPU: every stage on the tiny model, then GRPO at 667M, in one table.

Run on one GPU (budget: under 7 minutes on one H100; on one H100 it took 340 s, every row passing)::

    python benchmarks/gpu_check.py [--json gpu_check.json] [--peak-tflops 989]

Smoke test (the same code paths at a tiny size, well under a minute; ``tests/test_gpu_check.py``)::

    python benchmarks/gpu_check.py --device cpu --quick

Part 1, the tiny model (``configs/tiny/*.yaml``) in a temporary working folder, bf16-true on the
GPU, each through ``cli.py`` as a person would run it (``cli.main``: LightningCLI for ``fit`` /
``validate``, jsonargparse for the jobs), with the shipped configs copied there and only their
sizes changed (steps, batch sizes, record limits; ``accelerator``/``precision``):

- ``make-data``; ``sft`` (fit); ``build-pairs`` (from the SFT checkpoint); ``mpo`` (fit, on those
  pairs); ``grpo`` (fit, from the MPO checkpoint, with every callback of ``configs/tiny/grpo.yaml``:
  rewards, the Selective Sample Buffer, the hallucination monitor, critical-token entropy, the
  checkpoint and interrupt callbacks); ``validate`` (the GRPO checkpoint, on the GPU);
  ``evaluate`` and ``export`` (the GRPO checkpoint; the export is loaded back by path).
  ``build-pairs`` and ``evaluate`` load their checkpoint on the CPU (the jobs take no device).
  A briefly trained policy may sample fewer pairs than two MPO batches with the config's reward
  gap; pairs "reference response vs a denial" are then added for MPO (said in the row's note).

Part 2, GRPO at 667M: a ``TinyVLMConfig`` scaled as issue 16 did (vision 1024 wide x 24 layers
at 448 px, patch 14 -> 256 image tokens after pixel shuffle; LLM 896 wide x 24 layers, 14 heads,
2 KV heads, MLP 4864), built by ``build_tiny_model``, saved as a folder and loaded by path, 8
prompts x 8 samples, 128 new tokens, the tiny GRPO config's rewards, bf16-true, one GPU: plain,
DeepSpeed ZeRO-2 and ZeRO-3, each with the HF engine's static KV cache (``cache="static"``:
compiled, graph-replayed decoding on CUDA) and the dynamic one. ``benchmarks/gpu_step.py``'s
``run_variant`` runs each (a Trainer of ``--warmup + --steps`` rollout batches).

A failing row is reported with the first line of its error (the full traceback goes to stderr)
and the check goes on; a row whose input an earlier failure did not produce fails on that. The
whole check keeps to ``--budget-s`` (400 s on a GPU): a row is stopped (a fail, "not done after N s")
after ``--row-timeout-s`` (150 s on a GPU) or when the budget runs out, and rows are skipped once
fewer than 10 s are left; rerun a part alone with ``--parts big`` or ``--parts tiny``. On a CPU
(``--device cpu``) the DeepSpeed rows are skipped with the reason (Lightning's DeepSpeed strategy
refuses a CPU accelerator), unless ``--cpu-deepspeed`` runs them under
``lightning_r1v2.strategies.CPUDeepSpeedStrategy``.

One table, one row per job or GRPO variant: status (pass / fail: the error's first line / skip),
wall time, median step time, generation share of the step, rollout tokens/s (completion tokens /
generate time), update MFU (``benchmarks/gpu_step.py``'s formula, ``--peak-tflops``), peak memory
(``torch.cuda.max_memory_allocated``, reset per row; on a CPU the process's peak RSS, never reset).
``--json OUT`` writes the rows and the versions.

A bare GPU machine (CUDA torch installed, nothing else, no internet)
--------------------------------------------------------------------
On a machine with internet, with the GPU machine's Python version and torch installed::

    pip download -d .whl "jsonargparse[signatures]>=4.35" "math-verify>=0.7" docstring_parser typeshed_client \\
        hjson pydantic ninja psutil py-cpuinfo msgpack einops
    pip wheel --no-deps --no-build-isolation -w .whl deepspeed      # needs torch; a py3-none-any wheel

(none of these pulls torch; for another platform add ``--only-binary=:all: --platform
manylinux2014_x86_64 --python-version 3.X`` to ``pip download``: pydantic_core is compiled). These
are what the reference GPU image lacked; the check lists every missing module by its pip name
before it starts: fetch any other the same way (``--no-deps`` for one that depends on torch, such
as lightning or transformers). Copy ``.whl/`` and this checkout to the GPU machine, then::

    pip install --no-index --find-links .whl "jsonargparse[signatures]" math-verify docstring_parser \\
        typeshed_client hjson pydantic deepspeed
    python benchmarks/gpu_check.py --json gpu_check.json

(pip skips what is installed already; the check imports this checkout directly, so
``pip install -e .`` is not needed.)
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # this checkout's package and cli.py; gpu_step, grpo_step

# (module imported, pip name): what the check needs beyond torch
NEEDED = [
    ("lightning", "lightning"), ("transformers", "transformers"), ("torchmetrics", "torchmetrics"),
    ("jsonargparse", "jsonargparse[signatures]"), ("docstring_parser", "docstring_parser"),
    ("typeshed_client", "typeshed_client"), ("math_verify", "math-verify"),
    ("latex2sympy2_extended", "latex2sympy2_extended"), ("antlr4", "antlr4-python3-runtime"),
    ("PIL", "pillow"), ("yaml", "pyyaml"), ("tensorboard", "tensorboard"), ("matplotlib", "matplotlib"),
    ("accelerate", "accelerate"), ("deepspeed", "deepspeed"), ("hjson", "hjson"), ("pydantic", "pydantic"),
]
COLUMNS = ["row", "status", "wall s", "step s", "gen share %", "rollout tok/s", "update MFU %", "peak mem GB", "note"]
BIG = dict(image_size=448, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16, text_hidden=896,
           text_layers=24, text_heads=14, text_kv_heads=2, text_intermediate=4864, max_positions=1024)


def missing_modules() -> list[str]:
    """pip names of the ``NEEDED`` modules that are not installed."""
    out = []
    for mod, pip in NEEDED:
        try:
            found = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):  # a broken install, or a module blocked in sys.modules
            found = False
        if not found:
            out.append(pip)
    return out


def first_line(e: BaseException) -> str:
    """``Type: first line of the message`` (a ``SystemExit`` is an argument-parsing error printed above)."""
    if isinstance(e, SystemExit):
        return f"SystemExit({e.code}): the command line was refused (its message is printed above)"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


class RowTimeout(Exception):
    """A row ran past its time limit (raised in the main thread by SIGALRM)."""


class Check:
    """Runs rows one after another; a row that raises is a fail with its first error line.

    A row starts only while at least ``MIN_ROW_S`` of ``budget_s`` are left, and is stopped (a
    ``RowTimeout`` raised into it) after ``row_timeout_s`` (0: never) or when the budget runs out,
    whichever comes first; so the whole check ends within about ``budget_s``.
    """

    MIN_ROW_S = 10.0

    def __init__(self, device: str, budget_s: float, peak_tflops: float, row_timeout_s: float = 0.0):
        self.device, self.budget_s, self.peak_tflops = device, budget_s, peak_tflops
        self.row_timeout_s = row_timeout_s
        self.t0 = time.monotonic()
        self.rows: list[dict] = []

    def skip(self, name: str, why: str) -> None:
        self.rows.append({"row": name, "status": "skip", "note": why})
        print(f"[gpu_check] {name}: skip ({why})", flush=True)

    def run(self, name: str, fn, *args, **kwargs) -> dict | None:
        """``fn(*args, **kwargs)`` returns the row's metrics (``StepStats`` rows, a note); None if it failed."""
        import torch

        left = self.budget_s - (time.monotonic() - self.t0)
        if left < self.MIN_ROW_S:
            self.skip(name, f"time budget spent (--budget-s {self.budget_s:g})")
            return None
        limit = min(self.row_timeout_s, left) if self.row_timeout_s > 0 else left
        print(f"[gpu_check] {name}: start", flush=True)
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        row: dict = {"row": name}
        def alarm(signum, frame):
            raise RowTimeout(f"not done after {limit:.3g} s (--row-timeout-s {self.row_timeout_s:g}, "
                             f"--budget-s {self.budget_s:g})")

        previous = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            out = fn(*args, **kwargs) or {}
            signal.setitimer(signal.ITIMER_REAL, 0)
            row["status"] = "pass"
        except (Exception, SystemExit) as e:  # a parse error of the CLI exits; the check goes on
            signal.setitimer(signal.ITIMER_REAL, 0)
            traceback.print_exc()
            row["status"] = f"fail: {first_line(e)}"
            out = None
            e.__traceback__ = None  # drop the frames (and the tensors they hold) now
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        row["wall s"] = time.perf_counter() - t
        if self.device == "cuda":
            torch.cuda.synchronize()
            row["peak mem GB"] = torch.cuda.max_memory_allocated() / 1e9
        else:
            import resource

            row["peak mem GB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB
        if out:
            row.update({k: v for k, v in out.items() if k in COLUMNS})
        self.rows.append(row)
        print(f"[gpu_check] {name}: {row['status']} ({row['wall s']:.1f} s)", flush=True)
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
        return out if row["status"] == "pass" else None

    def step_columns(self, summary: dict) -> dict:
        """The table's step columns from ``gpu_step.summarize``'s dict."""
        gen = summary["generate s"]
        return {
            "step s": summary["step s"],
            "gen share %": 100 * gen / summary["step s"] if gen > 0 else None,
            "rollout tok/s": summary["rollout tok/s"] if gen > 0 else None,
            "update MFU %": summary["MFU %"],
        }


# ------------------------------------------------------------------ part 1: the tiny pipeline
def tiny_sizes(quick: bool) -> dict:
    """Steps, batch sizes and record counts of the tiny pipeline (``--quick``: the least that runs each path)."""
    if quick:
        return dict(train=48, val=8, sft_steps=2, sft_batch=4, pairs_limit=4, pairs_samples=4, mpo_steps=2, mpo_batch=2,
                    grpo_batches=2, grpo_prompts=2, grpo_group=4, eval_limit=4)
    return dict(train=512, val=64, sft_steps=60, sft_batch=32, pairs_limit=32, pairs_samples=8, mpo_steps=10,
                mpo_batch=8, grpo_batches=5, grpo_prompts=8, grpo_group=8, eval_limit=64)


def sized_config(name: str, out: Path, edit) -> str:
    """``configs/tiny/<name>.yaml`` loaded, changed by ``edit(cfg)``, written to ``out``; returns the path."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "tiny" / f"{name}.yaml").read_text())
    edit(cfg)
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(out)


def _trainer_edit(cfg: dict, accelerator: str, precision: str, **trainer) -> None:
    t = cfg.setdefault("trainer", {})
    t.update(accelerator=accelerator, devices=1, precision=precision, enable_progress_bar=False,
             enable_model_summary=False, **trainer)
    t["callbacks"] = [*t.get("callbacks", []), {"class_path": "gpu_step.StepStats"}]  # step times and tokens


def fit_row(check: Check, args: list[str]) -> dict:
    """``cli.py fit ARGS``; the step columns from its ``StepStats`` callback."""
    import cli
    from gpu_step import parameter_counts, summarize

    lc = cli.main(["fit", *args])
    stats = next(cb for cb in lc.trainer.callbacks if type(cb).__name__ == "StepStats")
    if not stats.rows:
        raise RuntimeError("fit ran no training step")
    rows = stats.rows[1:] or stats.rows  # the first step warms up (allocator, kernels)
    out = check.step_columns(summarize(rows, *parameter_counts(lc.model.model), check.peak_tflops))
    ours = [type(cb).__name__ for cb in lc.trainer.callbacks if type(cb).__module__.startswith("lightning_r1v2")]
    out["note"] = f"{len(stats.rows)} batches; callbacks: {', '.join(ours) or 'none'}"
    return out


def latest(*paths: str) -> str:
    """The first of ``paths`` that exists (an earlier stage may have failed)."""
    for p in paths:
        if Path(p).exists():
            return p
    raise FileNotFoundError(f"none of {list(paths)} exists (the stage that writes them failed above)")


def top_up_pairs(pairs_file: str, train_file: str, n: int) -> int:
    """Append pairs "reference response vs a denial" until ``pairs_file`` holds ``n``; returns how many were added.

    A briefly trained policy may sample fewer pairs than one MPO batch (which drops a short last
    batch) with the config's reward gap; MPO then still runs.
    """
    from lightning_r1v2.data.records import read_records
    from lightning_r1v2.jobs.sampling import output_record, write_jsonl

    have = [json.loads(line) for line in Path(pairs_file).read_text().splitlines() if line.strip()]
    if len(have) >= n:
        return 0
    records, _ = read_records(train_file)
    added = []
    for r in records[: n - len(have)]:
        row = {**output_record(r, Path(pairs_file).parent), "pair_id": f"{r['id']}/check", "chosen": r["response"],
               "rejected": "I can't see the image.", "chosen_reward": 1.0, "rejected_reward": 0.0, "gap": 1.0}
        row.pop("response", None)
        added.append(row)
    write_jsonl(pairs_file, have + added)
    return len(added)


def tiny_pipeline(check: Check, device: str, quick: bool, work: Path) -> None:
    """Part 1, in ``work`` (the configs' relative paths, ``data/tiny`` and ``runs/*``, land there)."""
    import cli

    s = tiny_sizes(quick)
    acc, prec = ("gpu", "bf16-true") if device == "cuda" else ("cpu", "32-true")

    check.run("make-data", cli.main, ["make-data", "--out", "data/tiny", "--train", str(s["train"]),
                                      "--val", str(s["val"]), "--seed", "0"])

    def sft(cfg):
        _trainer_edit(cfg, acc, prec, max_steps=s["sft_steps"], num_sanity_val_steps=0)
        cfg["data"]["init_args"]["batch_size"] = s["sft_batch"]
    check.run("sft", fit_row, check, ["--config", sized_config("sft", work / "sft.yaml", sft)])

    def pairs():
        cli.main(["build-pairs", "--config", str(ROOT / "configs/tiny/build_pairs.yaml"),
                  "--limit", str(s["pairs_limit"]), "--num_samples", str(s["pairs_samples"]), "--batch_size", "16"])
        n = sum(1 for line in open("data/tiny/pairs.jsonl") if line.strip())
        k = top_up_pairs("data/tiny/pairs.jsonl", "data/tiny/train.jsonl", 2 * s["mpo_batch"])
        return {"note": f"{n} pairs sampled" + (f"; {k} pairs 'reference vs denial' added for MPO" if k else "")}
    check.run("build-pairs (CPU)", pairs)

    def mpo(cfg):
        _trainer_edit(cfg, acc, prec, max_steps=s["mpo_steps"], limit_val_batches=1)
        cfg["data"]["init_args"]["batch_size"] = s["mpo_batch"]
    check.run("mpo", fit_row, check, ["--config", sized_config("mpo", work / "mpo.yaml", mpo)])

    def grpo(cfg):
        updates = cfg["model"]["init_args"]["updates_per_batch"]
        _trainer_edit(cfg, acc, prec, max_steps=s["grpo_batches"] * updates, val_check_interval=s["grpo_batches"],
                      limit_val_batches=1, num_sanity_val_steps=0)
        for cb in cfg["trainer"]["callbacks"]:
            if cb["class_path"].endswith("CriticalTokenEntropy"):
                cb["init_args"].update(num_prompts=4, every_n_steps=updates)  # every rollout batch
            if cb["class_path"].endswith("LastCheckpoint"):
                cb["init_args"]["every_n_train_steps"] = updates
        cfg["model"]["init_args"]["group_size"] = s["grpo_group"]
        cfg["model"]["init_args"]["table_every_n_steps"] = updates
        cfg["data"]["init_args"]["batch_size"] = s["grpo_prompts"]
    grpo_yaml = sized_config("grpo", work / "grpo.yaml", grpo)

    def grpo_fit():
        init = latest("runs/mpo/checkpoints/last.ckpt", "runs/sft/checkpoints/last.ckpt")
        return fit_row(check, ["--config", grpo_yaml, "--model.init_args.init_ckpt", init])
    check.run("grpo (every callback)", grpo_fit)

    grpo_ckpt = "runs/grpo/checkpoints/last.ckpt"
    check.run("validate", lambda: cli.main(["validate", "--config", grpo_yaml, "--ckpt_path", latest(grpo_ckpt)])
              and None)
    check.run("evaluate (CPU)", lambda: cli.main(["evaluate", "--ckpt_path", latest(grpo_ckpt), "--data",
                                                  "data/tiny/val.jsonl", "--limit", str(s["eval_limit"]),
                                                  "--out", "runs/eval.json"]) and None)

    def export():
        from lightning_r1v2.models.loading import load_policy

        cli.main(["export", "--ckpt_path", latest(grpo_ckpt), "--out", "runs/export"])
        model, _ = load_policy("runs/export")
        return {"note": f"reloaded by path: {sum(p.numel() for p in model.parameters()):,} parameters"}
    check.run("export", export)


# --------------------------------------------------------------------- part 2: GRPO at 667M
def build_folder(out: Path, quick: bool, device: str) -> dict:
    """The scaled ``TinyVLMConfig`` (``--quick``: the tiny one) built, saved with its processor in ``out``."""
    import torch

    from lightning_r1v2.models.tiny import TinyVLMConfig, build_processor, build_tiny_model

    cfg = TinyVLMConfig() if quick else TinyVLMConfig(**BIG)
    processor = build_processor(cfg)
    with torch.device(device):  # the random init runs on the GPU (seconds, not a minute on the CPU)
        model = build_tiny_model(cfg, processor.tokenizer)
    if device == "cuda":
        model = model.to(torch.bfloat16)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    return {"note": f"{n / 1e6:.1f}M parameters, {cfg.image_seq_length} image tokens, {model.dtype}"}


def grpo_variants(check: Check, a, folder: Path, train_file: str) -> None:
    """Part 2's rows: {1 device, ZeRO-2, ZeRO-3} x {static, dynamic} KV cache."""
    import torch
    from gpu_step import deepspeed_strategy, run_variant
    from grpo_step import load_config

    from lightning_r1v2.rollout import HFGenerateEngine

    cfg = load_config()
    ns = SimpleNamespace(seed=0, init_ckpt="none", group_size=a.group_size, max_new_tokens=a.max_new_tokens,
                         prompts=a.prompts, warmup=a.warmup, steps=a.steps, peak_tflops=a.peak_tflops)
    precision = "bf16-true" if a.device == "cuda" else "32-true"
    size = "tiny" if a.quick else "667M"
    for stage in a.stages:
        for cache in a.caches:
            where = "1 GPU" if a.device == "cuda" else "CPU"
            name = f"grpo {size} {where}" + (f" ZeRO-{stage}" if stage else "") + f" {cache} cache"
            if stage == 3 and a.zero3:
                name += " " + ",".join(f"{k.removeprefix('stage3_')}={v:g}" for k, v in a.zero3.items())
            if stage and a.device != "cuda" and not a.cpu_deepspeed:
                check.skip(name, "Lightning's DeepSpeedStrategy refuses a CPU (--cpu-deepspeed: CPUDeepSpeedStrategy)")
                continue

            def one(stage=stage, cache=cache, name=name):
                strategy = None
                if stage and a.device == "cuda":
                    strategy = deepspeed_strategy(stage)
                elif stage:
                    from lightning_r1v2.strategies import CPUDeepSpeedStrategy

                    strategy = CPUDeepSpeedStrategy(stage=stage)
                    strategy.config["gradient_clipping"] = 1.0
                if stage == 3 and a.zero3:
                    strategy.config["zero_optimization"].update(a.zero3)
                engine = HFGenerateEngine(max_new_tokens=a.max_new_tokens, temperature=1.0, cache=cache)
                res = run_variant(name, ns, cfg, train_file, a.device, precision, strategy,
                                  module_overrides={"model": str(folder), "engine": engine},
                                  data_overrides={"max_prompt_tokens": 1024})
                out = check.step_columns(res)
                out["note"] = f"{ns.prompts}x{ns.group_size} rows, {ns.max_new_tokens} new tokens, " \
                              f"{res['_params'] / 1e6:.1f}M params"
                return out
            check.run(name, one)
            if a.device == "cuda":  # free the compiled graphs (and their CUDA graph pools) of this variant's model
                try:
                    torch._dynamo.reset()
                except Exception as e:
                    print(f"[gpu_check] torch._dynamo.reset() failed: {first_line(e)}", flush=True)
                torch.cuda.empty_cache()


def big_part(check: Check, a, work: Path) -> None:
    """Part 2: the model folder, then the GRPO variants (on ``make-data``'s records, or its own)."""
    if not Path("data/tiny/train.jsonl").exists():  # --parts big
        from lightning_r1v2.data.synthetic import make_data

        make_data("data/tiny", train=a.prompts * (a.warmup + a.steps + 1), val=1, seed=0, difficulty="easy")
    folder = work / "model-667m"
    size = "tiny" if a.quick else "667M"
    if check.run(f"build {size} model folder", build_folder, folder, a.quick, a.device) is not None:
        grpo_variants(check, a, folder, str(work / "data/tiny/train.jsonl"))


# ---------------------------------------------------------------------------------- output
def _fmt(key: str, v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v.replace("|", "/")
    if key in ("rollout tok/s",):
        return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"
    if key in ("gen share %",):
        return f"{v:.0f}"
    if key in ("update MFU %",):
        return f"{v:.3g}"
    if key in ("peak mem GB",):
        return f"{v:.2f}"
    return f"{v:.3f}" if key == "step s" else f"{v:.1f}"


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(k, r.get(k)) for k in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    """Issue 16's targets read off the 667M GRPO rows that passed (none at ``--quick``'s tiny size): ZeRO-3
    step / ZeRO-2 step per cache (<= 1.5), and the best rollout tokens/s against the 2,422 of plain
    ``generate`` (>= 5x)."""
    grpo = {r["row"]: r for r in rows if r["row"].startswith("grpo 667M") and r["status"] == "pass" and r.get("step s")}
    out = []
    for cache in ("static", "dynamic"):
        z2 = next((r for n, r in grpo.items() if f"ZeRO-2 {cache} cache" in n), None)
        z3 = next((r for n, r in grpo.items() if f"ZeRO-3 {cache} cache" in n), None)
        if z2 and z3:
            out.append(f"ZeRO-3 / ZeRO-2 step time, {cache} cache: {z3['step s'] / z2['step s']:.2f} (target <= 1.5)")
    rates = [(r["rollout tok/s"], n) for n, r in grpo.items() if r.get("rollout tok/s")]
    if rates:
        best, name = max(rates)
        out.append(f"best 667M rollout tok/s: {best:,.0f} ({name}) = {best / 2422:.1f}x the 2,422 of plain generate "
                   "(target >= 5x)")
    return out


def versions(device: str) -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"}
    for mod in ("lightning", "transformers", "deepspeed"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception as e:  # a missing one shows as such; its rows fail on their own
            out[mod] = f"not importable ({first_line(e)})"
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cuda (default) or cpu (smoke test)")
    p.add_argument("--quick", action="store_true", help="tiny sizes everywhere (part 2 at the tiny model's size)")
    p.add_argument("--json", default=None, help="write the rows and the versions as JSON here")
    p.add_argument("--steps", type=int, default=2, help="measured rollout batches per GRPO variant (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured rollout batches first (default 1; compiles)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per GRPO variant's batch (default 8; quick 2)")
    p.add_argument("--group-size", type=int, default=None, help="samples per prompt (default 8; quick 2)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="completion length (default 128; quick 4)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (default 989: H100 SXM)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds for the whole check: a row is stopped when they run out, and rows are skipped "
                        "once fewer than 10 are left (default 400; cpu: 3600)")
    p.add_argument("--row-timeout-s", type=float, default=None,
                   help="stop a row after this many seconds, reported as a fail (default 150; cpu: 0, never)")
    p.add_argument("--stages", type=lambda s: [int(x) for x in s.split(",")], default=[0, 2, 3],
                   help="part 2's strategies: 0 (one device, no DeepSpeed), 2, 3 (ZeRO stages); default 0,2,3")
    p.add_argument("--caches", type=lambda s: s.split(","), default=["static", "dynamic"],
                   help="part 2's KV caches: static, dynamic; default both")
    p.add_argument("--zero3", type=json.loads, default=None,
                   help="JSON: extra zero_optimization settings for the ZeRO-3 rows, e.g. "
                        "'{\"stage3_param_persistence_threshold\": 1e7}' (the row's name lists them)")
    p.add_argument("--parts", default="tiny,big", help="which parts: tiny (the pipeline), big (GRPO variants)")
    p.add_argument("--cpu-deepspeed", action="store_true",
                   help="on a CPU, run the ZeRO rows under CPUDeepSpeedStrategy (slow: DeepSpeed builds an op first)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on a CPU (default 1)")
    a = p.parse_args(argv)
    a.prompts = a.prompts or (2 if a.quick else 8)
    a.group_size = a.group_size or (2 if a.quick else 8)
    a.max_new_tokens = a.max_new_tokens or (4 if a.quick else 128)
    budget = a.budget_s if a.budget_s is not None else (400.0 if a.device == "cuda" else 3600.0)
    parts = {x.strip() for x in a.parts.split(",") if x.strip()}
    if parts - {"tiny", "big"}:
        p.error(f"--parts: unknown {sorted(parts - {'tiny', 'big'})} (tiny, big)")
    if set(a.stages) - {0, 2, 3} or set(a.caches) - {"static", "dynamic"}:
        p.error(f"--stages takes 0, 2, 3 and --caches static, dynamic; got {a.stages} and {a.caches}")
    if a.zero3 is not None and not isinstance(a.zero3, dict):
        p.error(f"--zero3 takes a JSON object of zero_optimization settings, got {a.zero3!r}")

    missing = missing_modules()
    if missing:
        print(f"[gpu_check] missing modules (pip names): {' '.join(missing)}\n"
              "[gpu_check] install them from a folder of wheels: see `python benchmarks/gpu_check.py --help`",
              flush=True)
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible (use --device cpu --quick for the smoke test)")
    if a.device == "cpu":
        torch.set_num_threads(a.threads)
        if a.cpu_deepspeed:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model and processor here is local
    row_timeout = a.row_timeout_s if a.row_timeout_s is not None else (150.0 if a.device == "cuda" else 0.0)
    check = Check(a.device, budget, a.peak_tflops, row_timeout)
    if missing:
        check.rows.append({"row": "dependencies", "status": f"fail: missing {', '.join(missing)}",
                           "note": "see --help: install from a folder of wheels"})
    here = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        os.chdir(work)  # the configs' relative paths (data/tiny, runs/...) land in the temporary folder
        try:
            for part in ("tiny", "big"):
                if part not in parts:
                    continue
                try:
                    if part == "tiny":
                        tiny_pipeline(check, a.device, a.quick, work)
                    else:
                        big_part(check, a, work)
                except Exception as e:  # outside any row: an import that failed (a missing dependency)
                    traceback.print_exc()
                    check.rows.append({"row": f"{part} part (set-up)", "status": f"fail: {first_line(e)}"})
        finally:
            os.chdir(here)
    total = time.monotonic() - check.t0
    info = versions(a.device)
    print()
    print(f"gpu_check on {info['device']}: torch {info['torch']} (CUDA {info['cuda']}), lightning {info['lightning']}, "
          f"transformers {info['transformers']}, deepspeed {info['deepspeed']}; total {total:.0f} s")
    print(table(check.rows))
    for line in targets(check.rows):
        print(line)
    mem = "torch.cuda.max_memory_allocated, reset per row" if a.device == "cuda" else "process peak RSS, never reset"
    print(f"step s: median over the measured steps (GRPO variants: {a.steps} after {a.warmup} warm-up; fits: all "
          f"but the first); gen share: generate / step; update MFU: (2 x N + 4 x N_trainable) x T_update / (update s x "
          f"{a.peak_tflops:g} TFLOP/s) as benchmarks/gpu_step.py; peak mem: {mem}")
    n_fail = sum(r["status"].startswith("fail") for r in check.rows)
    print(f"{len(check.rows)} rows: {sum(r['status'] == 'pass' for r in check.rows)} pass, {n_fail} fail, "
          f"{sum(r['status'] == 'skip' for r in check.rows)} skip")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"versions": info, "args": vars(a), "total_s": total, "rows": check.rows},
                                           indent=2) + "\n")
    return check.rows


if __name__ == "__main__":
    rows = main()
    sys.exit(1 if any(r["status"].startswith("fail") for r in rows) else 0)
