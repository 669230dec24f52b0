"""``python -m lightning_r1v2.study`` (or ``cli.py study``): variants of the pipeline over seeds, side by side.

Each variant is a chain of the demo's stages, run through ``cli.py`` as ``make demo`` runs them
(``demo.run_cli``, ``demo.stage_config``); a stage that several variants share (the SFT checkpoint
of a seed, its MPO checkpoint, ...) runs once per (task, seed). Every (task, variant, seed) cell
writes ``<out>/cells/<task>/<variant>/seed<k>.json``; a rerun skips the cells already written (and
the stages already done), so an interrupted study resumes. Then one table: mean and standard
deviation over seeds of held-out accuracy, format and hallucination rate, with the wall time and
the rollouts each variant spent from scratch (``table.md``, ``table.csv``), and a plot of accuracy
against rollouts with a band over seeds (``accuracy_vs_rollouts.png``).

    python -m lightning_r1v2.study --scale small --seeds '[0,1,2]' --workers 1 --out runs/study

What varies with the seed: every fit's ``seed_everything``, the tiny model's init seed and the
data order's seed (the last two are settings of their own: ``seed_everything`` alone leaves SFT
bit-identical), and the sampling seed of build-pairs and prefilter. The data (one set per task, ``make-data --seed 0``) and its held-out split are the
same for every seed, so the spread is that of training alone.

Departures from the demo, and why:
- ``CriticalTokenEntropy`` is left out of GRPO (a monitor, not training: its generation would count
  as GRPO time in the comparison at equal wall time); SFT and MPO skip their in-fit validation
  (every checkpoint is evaluated afterwards, on the same held-out split, by greedy decoding).
- When prefilter keeps fewer prompts than a GRPO batch (tiny scales), GRPO trains on the whole
  training file and the cell says so (``prefilter_fallback``).
"""
from __future__ import annotations

import csv
import json
import math
import os
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .demo import ROOT, run_cli, shares_of, stage_config

TASKS = {
    # the demo's task: 2x2 grid, 3 colours, four question types
    "easy": {"difficulty": "easy"},
    # the same images, and every question needs two counts: how many more A than B, A more than B?, the most frequent
    "twostep": {"difficulty": "easy", "questions": ["diff", "compare", "most"]},
    # 4 colours and the two-count questions (the study's first harder task: after 500 SFT steps two seeds of three
    # still did not read the image)
    "twostep4": {"difficulty": "medium", "questions": ["diff", "compare", "most"]},
}
DEFAULT_TASKS = ("easy", "twostep")
"""The tasks a study runs unless ``--tasks`` names others (``twostep4`` only on request)."""


@dataclass(frozen=True)
class Scale:
    """How much each stage does. ``full`` is the demo's; ``quick`` is a smoke test, not a result."""

    train: int
    val: int
    sft_steps: int
    sft_batch: int
    pairs_questions: int  # build-pairs questions (0: every training record)
    pairs_samples: int
    mpo_steps: int  # 0: one epoch over the pairs (the config's)
    mpo_batch: int  # pairs per MPO step
    prefilter_prompts: int  # 0: every training record
    prefilter_k: int
    grpo_batches: int  # rollout batches (2 optimizer steps each, as configs/tiny/grpo.yaml)
    grpo_prompts: int  # prompts per rollout batch (x group_size rollouts)
    grpo_val_every: int  # rollout batches between held-out validations (the curve's points)


SCALES = {
    "quick": Scale(train=64, val=16, sft_steps=40, sft_batch=8, pairs_questions=8, pairs_samples=4, mpo_steps=2, mpo_batch=2,
                   prefilter_prompts=8, prefilter_k=4, grpo_batches=2, grpo_prompts=2, grpo_val_every=1),
    # what fits a shared 2-core machine: the demo's data and SFT; a tenth of its build-pairs and
    # prefilter questions; GRPO with half its prompts per batch and about half its batches (an SFT of
    # 200 steps left a policy at the majority answer whose count claims were 59% wrong)
    "small": Scale(train=4000, val=300, sft_steps=500, sft_batch=32, pairs_questions=400, pairs_samples=8, mpo_steps=0,
                   mpo_batch=16, prefilter_prompts=400, prefilter_k=8, grpo_batches=80, grpo_prompts=16, grpo_val_every=20),
    "full": Scale(train=4000, val=500, sft_steps=500, sft_batch=32, pairs_questions=0, pairs_samples=8, mpo_steps=0, mpo_batch=16,
                  prefilter_prompts=0, prefilter_k=8, grpo_batches=150, grpo_prompts=32, grpo_val_every=50),
}

MPO_THRESHOLDS = (0.1, 0.3, 0.5)
"""R1V2's MPO-threshold ablation, as the minimum reward gap of a pair under the GRPO stage's hybrid
reward (0.6 accuracy + 0.3 grounding + 0.1 format; a correct, grounded answer against a wrong,
grounded one is a gap of 0.6). The demo's MPO pairs (0.8 accuracy + 0.2 format, threshold 0.5)
have gaps of 0.8 or 1.0 once the format is learnt, so a threshold there changes nothing."""

VARIANTS = {
    "sft": "SFT (stage 1 of the demo)",
    "mpo": "SFT -> MPO (stage 2 of the demo)",
    "grpo": "SFT -> MPO -> prefilter -> GRPO with the buffer (the demo)",
    "grpo-nossb": "as grpo, without the Selective Sample Buffer (same rollouts generated)",
    "grpo-dynamic": "as grpo, DynamicSampling (online zero-variance filtering) instead of the buffer",
    "sft-grpo": "SFT -> GRPO with the buffer, on the training prompts",
    "sft-sft": "SFT -> continued SFT on the same prompts, for sft-grpo's GRPO wall time",
    **{f"mpo-t{t}": f"SFT -> MPO, pairs with a hybrid-reward gap >= {t}" for t in MPO_THRESHOLDS},
}
QUICK_VARIANTS = ("sft", "sft-grpo")


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)  # a cell or stage file is whole or absent


def _grpo_settings() -> dict:
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "tiny" / "grpo.yaml").read_text())
    return cfg["model"]["init_args"]


def _drop_callbacks(cfg: dict, *names: str) -> None:
    """Remove the trainer callbacks whose class name is one of ``names``."""
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].rsplit(".", 1)[-1] not in names]


def grpo_log_summary(logs: Path, batches: int, rollouts_per_batch: int) -> dict:
    """A GRPO stage's rollouts, accuracy curve and effective-sample shares, from its ``metrics.csv``.

    Rollouts: ``batches x rollouts_per_batch`` plus DynamicSampling's extra rollouts
    (``dynamic_sampling/extra_rollouts_total``). A validation logged at step ``k`` follows rollout
    batch ``k + 1``; its curve point is at the rollouts generated by then, extra ones included (the
    last total logged at or before ``k``). Effective share (the batch the loss saw): after the
    buffer (``ssb/effective_share_after``) or, with DynamicSampling, ``1 - zero_std_share_after``
    (a group-level share); ``effective_share_before``: the module's share as sampled.
    """
    from .jobs.plot import read_metrics

    metrics = sorted(Path(logs).rglob("metrics.csv"))
    series = read_metrics(metrics[-1]) if metrics else {}
    extra = series.get("dynamic_sampling/extra_rollouts_total", [])

    def extra_by(step: int) -> int:
        return int(max(((s, v) for s, v in extra if s <= step), default=(0, 0.0))[1])

    curve = [[(step + 1) * rollouts_per_batch + extra_by(step), acc] for step, acc in series.get("val/accuracy", [])]
    extra_total = int(extra[-1][1]) if extra else 0
    out = {"rollouts": batches * rollouts_per_batch + extra_total, "extra_rollouts": extra_total, "curve": curve,
           **shares_of(series)}
    after = [v for _, v in series.get("dynamic_sampling/zero_std_share_after", [])]
    if after and out["effective_share"] is None:
        out["effective_share"] = 1.0 - sum(after) / len(after)
    return out


class Chain:
    """The stages of one (task, seed). A stage runs once: its result is kept in
    ``<dir>/<stage>/stage.json``, and its checkpoint's held-out metrics in ``eval.json``."""

    def __init__(self, out: Path, data: Path, task: str, seed: int, scale: Scale):
        self.dir, self.data, self.task, self.seed, self.sc = out / task / f"seed{seed}", data, task, seed, scale
        self._val = None

    # -- plumbing --------------------------------------------------------------------------------
    def _stage(self, name: str, fn) -> dict:
        d = self.dir / name
        done = d / "stage.json"
        if done.exists():
            return json.loads(done.read_text())
        d.mkdir(parents=True, exist_ok=True)
        self._cpu = 0.0
        res = {"name": name, **fn(d)}
        res["cpu_seconds"] = self._cpu
        if "ckpt" in res and not Path(res["ckpt"]).exists():
            raise SystemExit(f"{self.task}/seed{self.seed} {name}: finished without writing {res['ckpt']} "
                             f"(log: {d / (name + '.log')})")
        _write_json(done, res)
        return res

    def _seed_args(self) -> list[str]:
        """A fit's seeds: Lightning's RNGs, the tiny model's init and the data order (each has its own)."""
        return ["--seed_everything", str(self.seed), "--model.init_args.seed", str(self.seed),
                "--data.init_args.seed", str(self.seed)]

    def _cli(self, name: str, d: Path, args: list[str]) -> float:
        """Run one stage's command; return its wall time, and add its CPU time (user + system,
        which other work on a shared machine barely changes) to the stage's."""
        def cpu():
            r = resource.getrusage(resource.RUSAGE_CHILDREN)  # children waited for: the finished stages
            return r.ru_utime + r.ru_stime
        before = cpu()
        wall = run_cli(f"{self.task}/seed{self.seed} {name}", args, d / f"{name}.log")
        self._cpu += cpu() - before
        return wall

    def evaluate(self, stage: dict) -> dict:
        """Held-out metrics of a stage's checkpoint (greedy decoding, as the demo's table)."""
        path = self.dir / stage["name"] / "eval.json"
        if path.exists():
            return json.loads(path.read_text())
        from .data.records import read_records
        from .jobs.evaluate import evaluate_module
        from .jobs.export import load_module

        if self._val is None:
            self._val = read_records(self.data / "val.jsonl")[0]
        t0 = time.perf_counter()
        m = evaluate_module(load_module(stage["ckpt"]), self._val, batch_size=100, max_new_tokens=24)
        m = {k: v for k, v in m.items() if k != "completions"}
        m["eval_seconds"] = time.perf_counter() - t0
        _write_json(path, m)
        return m

    # -- stages ------------------------------------------------------------------------------------
    def sft(self) -> dict:
        def run(d):
            cfg = stage_config("sft", d, self.data, d)
            secs = self._cli("sft", d, ["fit", "--config", cfg, *self._seed_args(),
                                        "--trainer.max_steps", str(self.sc.sft_steps),
                                        "--data.init_args.batch_size", str(self.sc.sft_batch),
                                        "--trainer.limit_val_batches", "0"])
            return {"ckpt": str(d / "sft" / "checkpoints" / "last.ckpt"), "seconds": secs, "rollouts": 0,
                    "steps": self.sc.sft_steps}
        return self._stage("sft", run)

    def sft_continued(self) -> dict:
        """Continued SFT from the SFT checkpoint on the same training records, for as many steps as
        sft-grpo's GRPO stage took CPU seconds at this chain's SFT rate (CPU seconds per step of the
        first SFT stage, its start-up included): equal compute, measured as CPU time."""
        sft, rl = self.sft(), self.sft_grpo()

        def run(d):
            steps = max(1, round(rl["cpu_seconds"] / (sft["cpu_seconds"] / sft["steps"])))
            cfg = stage_config("sft", d, self.data, d)
            secs = self._cli("sft-continued", d, [
                "fit", "--config", cfg, *self._seed_args(), "--model.init_args.init_ckpt", sft["ckpt"],
                "--trainer.max_steps", str(steps), "--data.init_args.batch_size", str(self.sc.sft_batch),
                "--trainer.limit_val_batches", "0"])
            return {"ckpt": str(d / "sft" / "checkpoints" / "last.ckpt"), "seconds": secs, "rollouts": 0,
                    "steps": steps, "target_cpu_seconds": rl["cpu_seconds"]}
        return self._stage("sft-continued", run)

    def pairs(self, threshold: float | None = None) -> dict:
        """build-pairs from the SFT policy: the demo's (``None``), or with the hybrid reward and a threshold."""
        sft = self.sft()
        name = "pairs" if threshold is None else f"pairs-t{threshold}"

        def run(d):
            def hybrid(cfg):
                import yaml

                grpo = yaml.safe_load((ROOT / "configs" / "tiny" / "grpo.yaml").read_text())
                cfg["rewards"] = [c for c in grpo["trainer"]["callbacks"] if c["class_path"].endswith("RewardCallback")]
                cfg["reward_mode"] = grpo["model"]["init_args"]["reward_mode"]
            cfg = stage_config("build_pairs", d, self.data, d, edit=None if threshold is None else hybrid)
            out = d / "pairs.jsonl"
            args = ["build-pairs", "--config", cfg, "--ckpt_path", sft["ckpt"], "--out", str(out),
                    "--seed", str(self.seed), "--limit", str(self.sc.pairs_questions),
                    "--num_samples", str(self.sc.pairs_samples)]
            if threshold is not None:
                args += ["--threshold", str(threshold)]
            secs = self._cli(name, d, args)
            rep = json.loads((d / "pairs.report.json").read_text())
            return {"file": str(out), "seconds": secs, "rollouts": rep["samples"], "pairs": rep["pairs"]}
        return self._stage(name, run)

    def mpo(self, threshold: float | None = None) -> dict:
        sft, pairs = self.sft(), self.pairs(threshold)
        name = "mpo" if threshold is None else f"mpo-t{threshold}"

        def run(d):
            cfg = stage_config("mpo", d, self.data, d)
            steps = ["--trainer.max_steps", str(self.sc.mpo_steps)] if self.sc.mpo_steps else []
            secs = self._cli(name, d, ["fit", "--config", cfg, *self._seed_args(),
                                       "--model.init_args.init_ckpt", sft["ckpt"],
                                       "--data.init_args.train_file", pairs["file"],
                                       "--data.init_args.batch_size", str(self.sc.mpo_batch),
                                       "--trainer.limit_val_batches", "0", *steps])
            return {"ckpt": str(d / "mpo" / "checkpoints" / "last.ckpt"), "seconds": secs, "rollouts": 0}
        return self._stage(name, run)

    def prefilter(self) -> dict:
        mpo = self.mpo()

        def run(d):
            cfg = stage_config("prefilter", d, self.data, d)
            out = d / "train.prefiltered.jsonl"
            secs = self._cli("prefilter", d, ["prefilter", "--config", cfg, "--ckpt_path", mpo["ckpt"], "--out", str(out),
                                              "--seed", str(self.seed), "--limit", str(self.sc.prefilter_prompts),
                                              "--k", str(self.sc.prefilter_k)])
            prompts = self.sc.prefilter_prompts or self.sc.train
            kept = sum(1 for line in out.read_text().splitlines() if line.strip())
            return {"file": str(out), "seconds": secs, "rollouts": prompts * self.sc.prefilter_k, "kept": kept}
        return self._stage("prefilter", run)

    def grpo(self, name: str, init: dict, train_file: str, callbacks: str = "buffer", val_every: int = 0) -> dict:
        """A GRPO stage from ``init``'s checkpoint; ``callbacks``: ``buffer`` (the demo's), ``none``
        (no buffer) or ``dynamic`` (DynamicSampling instead of the buffer)."""
        g = _grpo_settings()
        G, updates = g["group_size"], g["updates_per_batch"]
        sc = self.sc

        def edit(cfg):
            _drop_callbacks(cfg, "CriticalTokenEntropy")
            cbs = cfg["trainer"]["callbacks"]
            at = next(i for i, c in enumerate(cbs) if c["class_path"].endswith("SelectiveSampleBuffer"))
            if callbacks == "none":
                del cbs[at]
            elif callbacks == "dynamic":  # in the buffer's place, with configs/tiny/grpo_dapo.yaml's settings
                cbs[at] = {"class_path": "lightning_r1v2.callbacks.DynamicSampling",
                           "init_args": {"min_share": 1.0, "max_extra_prompts": 64}}

        def run(d):
            cfg = stage_config("grpo", d, self.data, d, edit=edit)
            every = val_every or sc.grpo_val_every
            secs = self._cli(name, d, ["fit", "--config", cfg, *self._seed_args(),
                                       "--model.init_args.init_ckpt", init["ckpt"],
                                       "--data.init_args.train_file", train_file,
                                       # prefilter's output lies in the stage folder, its images in the task's data folder
                                       "--data.init_args.allow_outside_paths", "true",
                                       "--data.init_args.batch_size", str(sc.grpo_prompts),
                                       "--trainer.max_steps", str(sc.grpo_batches * updates),
                                       "--trainer.val_check_interval", str(every)])
            return {"ckpt": str(d / "grpo" / "checkpoints" / "last.ckpt"), "seconds": secs,
                    **grpo_log_summary(d / "grpo" / "logs", sc.grpo_batches, sc.grpo_prompts * G)}
        return self._stage(name, run)

    def _prefiltered_file(self) -> tuple[str, bool]:
        pre = self.prefilter()
        if pre["kept"] >= self.sc.grpo_prompts:
            return pre["file"], False
        return str(self.data / "train.jsonl"), True

    def sft_grpo(self) -> dict:
        # one validation, at the end: the stage's wall time is the budget of continued SFT
        return self.grpo("sft-grpo", self.sft(), str(self.data / "train.jsonl"), val_every=self.sc.grpo_batches)

    # -- variants ------------------------------------------------------------------------------------
    def path(self, variant: str) -> tuple[list[dict], dict]:
        """The stages of ``variant`` from scratch, and notes for its cell."""
        notes: dict = {}
        if variant == "sft":
            return [self.sft()], notes
        if variant == "mpo":
            return [self.sft(), self.pairs(), self.mpo()], notes
        if variant.startswith("mpo-t"):
            t = float(variant[len("mpo-t"):])
            return [self.sft(), self.pairs(t), self.mpo(t)], notes
        if variant in ("grpo", "grpo-nossb", "grpo-dynamic"):
            head = [self.sft(), self.pairs(), self.mpo(), self.prefilter()]
            train_file, notes["prefilter_fallback"] = self._prefiltered_file()
            cbs = {"grpo": "buffer", "grpo-nossb": "none", "grpo-dynamic": "dynamic"}[variant]
            return head + [self.grpo(variant, head[2], train_file, cbs)], notes
        if variant == "sft-grpo":
            return [self.sft(), self.sft_grpo()], notes
        if variant == "sft-sft":
            return [self.sft(), self.sft_continued()], notes
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")

    def cell(self, variant: str) -> dict:
        """Run ``variant`` (reusing done stages) and return its cell: final metrics, time, rollouts, curve."""
        stages, notes = self.path(variant)
        final = self.evaluate(stages[-1])
        curve, spent = [], 0
        for st in stages:
            curve += [[spent + r, acc] for r, acc in st.get("curve", []) if r < st["rollouts"]]
            spent += st["rollouts"]
            if "ckpt" in st:
                curve.append([spent, self.evaluate(st)["accuracy"]])
        last = stages[-1]
        return {
            "task": self.task, "variant": variant, "seed": self.seed,
            "accuracy": final["accuracy"], "accuracy_letter_only": final["accuracy_letter_only"],
            "format": final["format"], "hallucination": final["hallucination"],
            "accuracy_by_type": final["accuracy_by_type"],
            "seconds": sum(st["seconds"] for st in stages), "cpu_seconds": sum(st["cpu_seconds"] for st in stages),
            "rollouts": spent,
            "curve": curve,
            "stages": [{k: st[k] for k in ("name", "seconds", "cpu_seconds", "rollouts")} for st in stages],
            **{k: last[k] for k in ("effective_share", "effective_share_before", "extra_rollouts", "steps",
                                    "target_cpu_seconds") if k in last},
            **notes,
        }


def cell_path(out: Path, task: str, variant: str, seed: int) -> Path:
    return out / "cells" / task / variant / f"seed{seed}.json"


def run_chain(out: str, data: str, task: str, seed: int, scale: dict, variants: list[str]) -> list[str]:
    """Every missing cell of one (task, seed), in order; return the failures (a failed stage stops
    only the variants that need it)."""
    chain = Chain(Path(out) / "runs", Path(data), task, seed, Scale(**scale))
    failed = []
    for v in variants:
        path = cell_path(Path(out), task, v, seed)
        if path.exists():
            print(f"study: {task}/{v}/seed{seed} done before, skipped", flush=True)
            continue
        try:
            cell = chain.cell(v)
        except (SystemExit, Exception) as e:  # run_cli's SystemExit carries the log's tail
            print(f"study: {task}/{v}/seed{seed} failed: {type(e).__name__}: {e}", flush=True)
            failed.append(f"{task}/{v}/seed{seed}")
            continue
        _write_json(path, cell)
        print(f"study: {task}/{v}/seed{seed}: accuracy {cell['accuracy']:.3f}, {cell['seconds']:.0f}s, "
              f"{cell['rollouts']} rollouts", flush=True)
    return failed


# -- the table ------------------------------------------------------------------------------------------
def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1 in the denominator) of the values that are not
    None or NaN (a hallucination rate is NaN where no answer made a claim); None where too few."""
    values = [v for v in values if v is not None and v == v]
    n = len(values)
    if n == 0:
        return None, None
    m = sum(values) / n
    if n < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


METRICS = ("accuracy", "format", "hallucination", "effective_share")
COLUMNS = ["task", "variant", "seeds", *(f"{m}_{s}" for m in METRICS for s in ("mean", "std")),
           "seconds_mean", "cpu_seconds_mean", "rollouts_mean", "description"]


def _effective_share(cell: dict) -> float | None:
    """Share of the rows the GRPO loss saw with a non-zero advantage, averaged over the run: after
    the buffer where there is one, else the batch as sampled; None for a variant without GRPO."""
    after = cell.get("effective_share")
    return after if after is not None else cell.get("effective_share_before")


def load_cells(out: Path) -> list[dict]:
    """Every cell written under ``out/cells`` (``cell_path``), in path order."""
    return [json.loads(p.read_text()) for p in sorted((Path(out) / "cells").glob("*/*/seed*.json"))]


def summarise(out: Path, tasks: list[str] | None = None, variants: list[str] | None = None) -> list[dict]:
    """One row per (task, variant) over the cells written under ``out``, in ``tasks`` / ``variants`` order."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for c in load_cells(out):
        c["effective_share"] = _effective_share(c)
        cells.setdefault((c["task"], c["variant"]), []).append(c)
    t_order = {t: i for i, t in enumerate(tasks or DEFAULT_TASKS)}
    v_order = {v: i for i, v in enumerate(variants or VARIANTS)}
    keys = sorted(cells, key=lambda k: (t_order.get(k[0], 99), k[0], v_order.get(k[1], 99), k[1]))
    rows = []
    for task, variant in keys:
        cs = sorted(cells[(task, variant)], key=lambda c: c["seed"])
        row = {"task": task, "variant": variant, "seeds": len(cs), "seed_list": [c["seed"] for c in cs]}
        for m in METRICS:
            row[f"{m}_mean"], row[f"{m}_std"] = mean_std([c[m] for c in cs])
        row["seconds_mean"] = mean_std([c["seconds"] for c in cs])[0]
        row["cpu_seconds_mean"] = mean_std([c.get("cpu_seconds") for c in cs])[0]
        row["rollouts_mean"] = mean_std([c["rollouts"] for c in cs])[0]
        row["description"] = VARIANTS.get(variant, "")
        rows.append(row)
    return rows


def _num(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def _pm(mean, std) -> str:
    if mean is None:
        return "-"
    s = f"{100 * mean:.1f}%"
    return s + (f" ± {100 * std:.1f}" if std is not None else "")


def markdown(rows: list[dict], baselines: dict[str, float] | None = None) -> str:
    lines = ["| task | variant | seeds | held-out accuracy | format rate | hallucination rate | effective samples "
             "| wall (s) | CPU (s) | rollouts |", "|---|---|---|---|---|---|---|---|---|---|"]
    for task, acc in (baselines or {}).items():
        lines.append(f"| {task} | majority answer | - | {100 * acc:.1f}% | - | - | - | - | - | - |")
    for r in rows:
        lines.append(f"| {r['task']} | {r['variant']} | {r['seeds']} | {_pm(r['accuracy_mean'], r['accuracy_std'])} "
                     f"| {_pm(r['format_mean'], r['format_std'])} | {_pm(r['hallucination_mean'], r['hallucination_std'])} "
                     f"| {_pm(r['effective_share_mean'], r['effective_share_std'])} "
                     f"| {r['seconds_mean']:.0f} | {_num(r['cpu_seconds_mean'])} | {r['rollouts_mean']:.0f} |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})


def plot_curves(out: Path, path: Path) -> None:
    """Held-out accuracy against rollouts spent, per task and variant: the mean over seeds, a band of
    +- one standard deviation (curves of one variant share their x positions across seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by: dict[str, dict[str, list[list]]] = {}
    for c in load_cells(out):
        by.setdefault(c["task"], {}).setdefault(c["variant"], []).append(c["curve"])
    tasks = sorted(by)
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for variant, curves in by[task].items():
            n = min(len(c) for c in curves)
            xs = [sum(c[i][0] for c in curves) / len(curves) for i in range(n)]
            stats = [mean_std([c[i][1] for c in curves]) for i in range(n)]
            ys = [100 * m for m, _ in stats]
            sd = [100 * (s or 0.0) for _, s in stats]
            line, = ax.plot(xs, ys, marker="o", ms=3, label=f"{variant} ({len(curves)} seeds)")
            ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)],
                            color=line.get_color(), alpha=0.2)
        ax.set_title(f"task: {task}")
        ax.set_xlabel("rollouts generated (cumulative, from scratch)")
        ax.set_ylabel("held-out accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


COMPARISONS = (
    ("mpo", "sft", "MPO adds"),
    ("grpo", "mpo", "GRPO (with prefilter) adds to MPO"),
    ("grpo", "sft", "the demo's chain against its SFT"),
    ("grpo", "grpo-nossb", "the buffer, at equal rollouts"),
    ("grpo-dynamic", "grpo", "dynamic sampling against the buffer"),
    ("sft-grpo", "sft-sft", "GRPO against continued SFT, at equal CPU time"),
    ("sft-grpo", "sft", "GRPO adds to SFT"),
    ("sft-sft", "sft", "continued SFT adds to SFT"),
    ("mpo-t0.1", "mpo-t0.5", "MPO threshold 0.1 against 0.5"),
    ("mpo-t0.3", "mpo-t0.5", "MPO threshold 0.3 against 0.5"),
)
"""Paired comparisons: the variants of one (task, seed) share their earlier stages, so the
difference is taken seed by seed, then its mean and standard deviation over seeds."""


T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086)
"""Student's t, two-sided 95% (the 0.975 quantile), for 1 to 20 degrees of freedom (standard tables)."""


def paired_t(diffs: list[float]) -> tuple[float | None, bool | None]:
    """The paired t statistic ``mean / (std / sqrt(n))`` of per-seed differences, and whether it lies
    beyond the two-sided 95% critical value with ``n - 1`` degrees of freedom (None: fewer than 2
    seeds; past 20 degrees of freedom the normal 1.96). Zero spread: t is infinite unless the mean is 0."""
    n = len(diffs)
    if n < 2:
        return None, None
    mean, std = mean_std(diffs)
    if std == 0:
        t = 0.0 if mean == 0 else math.copysign(math.inf, mean)
    else:
        t = mean / (std / math.sqrt(n))
    crit = T_975[n - 2] if n - 1 <= len(T_975) else 1.96
    return t, abs(t) > crit


def paired_differences(out: Path, metric: str = "accuracy") -> list[dict]:
    """Per task and comparison ``(a, b)``: ``a - b`` of ``metric`` on each seed that has both cells;
    mean and sample standard deviation of those differences, the paired t statistic and whether the
    difference is beyond noise at 95% (``paired_t``)."""
    cells: dict[tuple[str, str, int], dict] = {}
    for c in load_cells(out):
        cells[(c["task"], c["variant"], c["seed"])] = c
    rows = []
    for task in sorted({k[0] for k in cells}, key=lambda t: (list(TASKS).index(t) if t in TASKS else 99, t)):
        for a, b, what in COMPARISONS:
            seeds = sorted(s for (t, v, s) in cells if t == task and v == a and (task, b, s) in cells)
            if not seeds:
                continue
            diffs = [cells[(task, a, s)][metric] - cells[(task, b, s)][metric] for s in seeds]
            mean, std = mean_std(diffs)
            t, beyond = paired_t(diffs)
            rows.append({"task": task, "a": a, "b": b, "what": what, "seeds": seeds, "diffs": diffs,
                         "mean": mean, "std": std, "t": t, "beyond_noise": beyond})
    return rows


def differences_markdown(rows: list[dict]) -> str:
    lines = ["| task | comparison | seeds | accuracy difference per seed (points) | mean ± std | paired t | beyond noise (95%) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        per = ", ".join(f"{100 * d:+.1f}" for d in r["diffs"])
        pm = f"{100 * r['mean']:+.1f}" + (f" ± {100 * r['std']:.1f}" if r["std"] is not None else "")
        t = "-" if r.get("t") is None else f"{r['t']:+.1f}"
        beyond = {None: "-", True: "yes", False: "no"}[r.get("beyond_noise")]
        lines.append(f"| {r['task']} | {r['a']} − {r['b']} ({r['what']}) | {len(r['seeds'])} | {per} | {pm} | {t} | {beyond} |")
    return "\n".join(lines)


def report(out: Path, tasks: list[str] | None = None, variants: list[str] | None = None) -> str:
    """Write ``table.csv``, ``table.md`` (with the paired differences) and ``accuracy_vs_rollouts.png``
    from the cells; return the Markdown."""
    from .data.records import read_records
    from .jobs.evaluate import majority_baseline

    out = Path(out)
    rows = summarise(out, tasks, variants)
    baselines = {}
    for task in tasks or DEFAULT_TASKS:
        d = out / "data" / task
        if (d / "val.jsonl").exists() and (d / "train.jsonl").exists():
            baselines[task] = majority_baseline(read_records(d / "val.jsonl", check_images=False)[0],
                                                read_records(d / "train.jsonl", check_images=False)[0])
    md = markdown(rows, baselines)
    diffs = paired_differences(out)
    if diffs:
        md += "\n\nPaired differences (same task and seed, shared earlier stages):\n\n" + differences_markdown(diffs)
    (out / "table.md").write_text(md + "\n")
    write_csv(rows, out / "table.csv")
    plot_curves(out, out / "accuracy_vs_rollouts.png")
    return md


def study(
    out: str = "runs/study",
    scale: str = "small",
    tasks: list[str] | None = None,
    variants: list[str] | None = None,
    seeds: list[int] | None = None,
    workers: int = 1,
    quick: bool = False,
) -> list[dict]:
    """Run the study's cells (skipping those already written), then print and write the table.

    Args:
        out: Folder of the study: ``data/<task>``, ``runs/<task>/seed<k>/<stage>``,
            ``cells/<task>/<variant>/seed<k>.json``, ``table.md``, ``table.csv``, ``accuracy_vs_rollouts.png``.
        scale: ``quick`` (a smoke test), ``small`` or ``full`` (the demo's sizes); see ``SCALES``.
        tasks: Tasks (default: ``DEFAULT_TASKS``, ``easy`` and ``twostep``; ``twostep4`` on request).
        variants: Variants, in the table's order (default: all of ``VARIANTS``).
        seeds: Training seeds (default ``[0, 1, 2]``).
        workers: (task, seed) chains run at once, each in its own process (default 1). Every
            stage runs with ``OMP_NUM_THREADS=1`` unless it is set, so N workers keep N cores busy.
        quick: ``--scale quick``, the ``easy`` task, variants ``sft`` and ``sft-grpo``, seeds 0 and 1
            (each still overridable).
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as the demo's README run; inherited by every stage
    if quick:
        scale, tasks, variants, seeds = "quick", tasks or ["easy"], variants or list(QUICK_VARIANTS), seeds or [0, 1]
    tasks = list(tasks or DEFAULT_TASKS)
    seeds = list(seeds if seeds is not None else [0, 1, 2])
    variants = list(VARIANTS) if variants is None else list(variants)
    bad = [v for v in variants if v not in VARIANTS] + [t for t in tasks if t not in TASKS]
    if bad:
        raise ValueError(f"unknown {bad}; variants: {sorted(VARIANTS)}; tasks: {sorted(TASKS)}")
    sc = SCALES[scale]
    root = (ROOT / out).resolve()
    t0 = time.perf_counter()
    for task in tasks:  # one data set per task, shared by every seed
        d = root / "data" / task
        if not (d / "val.jsonl").exists():
            spec = TASKS[task]
            args = ["make-data", "--out", str(d), "--train", str(sc.train), "--val", str(sc.val), "--seed", "0",
                    "--difficulty", spec["difficulty"]]
            if "questions" in spec:
                args += ["--questions", json.dumps(spec["questions"])]
            (root / "logs").mkdir(parents=True, exist_ok=True)
            run_cli(f"{task} make-data", args, root / "logs" / f"make_data_{task}.log")
    jobs = [(str(root), str(root / "data" / t), t, s, asdict(sc), variants) for s in seeds for t in tasks]
    failed: list[str] = []
    if workers <= 1:
        for j in jobs:
            failed += run_chain(*j)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            for f in [pool.submit(run_chain, *j) for j in jobs]:
                failed += f.result()
    md = report(root, tasks, variants)
    print("\n" + md)
    print(f"\nstudy: {time.perf_counter() - t0:.0f}s this run; {root / 'table.md'}, {root / 'table.csv'}, "
          f"{root / 'accuracy_vs_rollouts.png'}" + (f"; failed: {failed}" if failed else ""), flush=True)
    return summarise(root, tasks, variants)


if __name__ == "__main__":
    import sys

    from jsonargparse import CLI

    # a bare --quick means --quick true
    CLI(study, args=["--quick=true" if a == "--quick" else a for a in sys.argv[1:]], as_positional=False)
