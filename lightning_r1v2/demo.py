"""``make demo``: the whole R1V2 pipeline on the embedded default, end to end, on a CPU.

make-data -> SFT -> build-pairs -> MPO -> prefilter -> GRPO (buffer, rewards, monitors), then
every stage's checkpoint is evaluated on the same held-out set (a split no stage trains on) and
a table is printed. Each stage runs through ``cli.py`` exactly as a user would run it, writing
under ``runs/demo/``; plots go to ``runs/demo/plots``. The table comes from this run.

    python -m lightning_r1v2.demo [--out runs/demo] [--data data/demo] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(title: str, args: list[str], log: Path) -> float:
    """Run ``python cli.py ARGS`` in this checkout, its output to ``log``; return its wall time (s).

    The lines worth seeing are echoed; a failure raises ``SystemExit`` with the log's tail."""
    print(f"\n=== {title}\n$ python cli.py {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    stop = threading.Event()

    def heartbeat():  # Lightning's progress bar does not draw into a pipe: show that work goes on
        while not stop.wait(30):
            print(f"  ... {title.split(' ', 1)[1]} running, {time.perf_counter() - t0:.0f}s", flush=True)

    threading.Thread(target=heartbeat, daemon=True).start()
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
        for line in proc.stdout:
            f.write(line)
            if _worth_showing(line):
                print("  " + line.rstrip()[:160], flush=True)
        code = proc.wait()
    stop.set()
    took = time.perf_counter() - t0
    if code != 0:
        tail = log.read_text().splitlines()[-25:]
        raise SystemExit(f"{title} failed (exit {code}); last lines of {log}:\n" + "\n".join(tail))
    print(f"  done in {took:.0f}s (log: {log})", flush=True)
    return took


def _worth_showing(line: str) -> bool:
    keys = ("make-data:", "trainable parts", "build-pairs", "prefilter", "val/accuracy", "pairs", "kept",
            "Epoch", "progress", "wrote", "skipped", "Error", "error")
    return any(k in line for k in keys) and "Warning" not in line


def stage_config(name: str, out: Path, data: Path, into: Path, edit=None) -> str:
    """A copy of ``configs/tiny/<name>.yaml`` writing under ``out`` and reading ``data``.

    ``edit``, if given, is called with the parsed config (a dict) and may change it in place
    (the copy is then written without the comments)."""
    text = (ROOT / "configs" / "tiny" / f"{name}.yaml").read_text()
    text = text.replace("runs/", f"{out}/").replace("data/tiny/", f"{data}/")
    if edit is not None:
        import yaml

        cfg = yaml.safe_load(text)
        edit(cfg)
        text = yaml.safe_dump(cfg, sort_keys=False)
    path = into / f"{name}.yaml"
    path.write_text(text)
    return str(path)


def effective_shares(run_dir: Path) -> dict:
    """Mean effective-sample share of a GRPO run: after the buffer (``effective_share``) and as
    sampled (``effective_share_before``); None where the run did not log it."""
    from .jobs.plot import read_metrics

    metrics = sorted(Path(run_dir).rglob("metrics.csv"))
    return shares_of(read_metrics(metrics[-1]) if metrics else {})


def shares_of(series: dict) -> dict:
    """``effective_shares`` of a run's metrics already read (``jobs.plot.read_metrics``)."""
    out = {}
    for name, col in (("effective_share", "ssb/effective_share_after"), ("effective_share_before", "effective_share")):
        vals = [v for _, v in series.get(col, [])]
        out[name] = sum(vals) / len(vals) if vals else None
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="where runs, logs, checkpoints and plots go")
    p.add_argument("--data", default="data/demo", help="where the synthetic task is written")
    p.add_argument("--quick", action="store_true", help="a few steps of each stage (a smoke test, not a result)")
    a = p.parse_args(argv)
    out, data = (ROOT / a.out).resolve(), (ROOT / a.data).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    q = a.quick
    times: dict[str, float] = {}
    t_start = time.perf_counter()

    n_train, n_val = (64, 16) if q else (4000, 500)
    times["data"] = run_cli("1/7 make-data", ["make-data", "--out", str(data), "--train", str(n_train),
                                           "--val", str(n_val), "--seed", "0"], logs / "make_data.log")
    sft, mpo, grpo = out / "sft", out / "mpo", out / "grpo"
    cfg = {n: stage_config(n, out, data, logs) for n in ("sft", "build_pairs", "mpo", "prefilter", "grpo")}
    # quick: 40 SFT steps (the study's quick scale); after 3 the policy sampled no pair with the reward gap
    quick_sft = ["--trainer.max_steps", "40", "--data.init_args.batch_size", "8"] if q else []
    times["SFT"] = run_cli("2/7 SFT", ["fit", "--config", cfg["sft"], *quick_sft], logs / "sft.log")
    sft_ckpt = sft / "checkpoints" / "last.ckpt"
    times["pairs"] = run_cli("3/7 build-pairs", [
        "build-pairs", "--config", cfg["build_pairs"], "--ckpt_path", str(sft_ckpt),
        *(["--limit", "32", "--num_samples", "4"] if q else []),
    ], logs / "build_pairs.log")
    quick_mpo = ["--trainer.max_steps", "3", "--data.init_args.batch_size", "2"] if q else []
    times["MPO"] = run_cli("4/7 MPO", ["fit", "--config", cfg["mpo"], "--model.init_args.init_ckpt", str(sft_ckpt),
                                    *quick_mpo], logs / "mpo.log")
    mpo_ckpt = mpo / "checkpoints" / "last.ckpt"
    kept = data / "train.prefiltered.jsonl"
    times["prefilter"] = run_cli("5/7 prefilter", [
        "prefilter", "--config", cfg["prefilter"], "--ckpt_path", str(mpo_ckpt), "--out", str(kept),
        *(["--limit", "16", "--k", "4"] if q else []),
    ], logs / "prefilter.log")
    times["GRPO"] = run_cli("6/7 GRPO", [
        "fit", "--config", cfg["grpo"], "--data.init_args.train_file", str(kept),
        "--model.init_args.init_ckpt", str(mpo_ckpt),
        *(["--trainer.max_steps", "2", "--data.init_args.batch_size", "2"] if q else []),
    ], logs / "grpo.log")

    print("\n=== 7/7 evaluate every stage on the same held-out set", flush=True)
    from .data.records import read_records
    from .jobs.evaluate import evaluate_module, majority_baseline
    from .jobs.export import load_module
    from .jobs.plot import plot

    val, _ = read_records(data / "val.jsonl")
    train, _ = read_records(data / "train.jsonl", check_images=False)
    results = [{"stage": "majority answer", "accuracy": majority_baseline(val, train), "format": None,
                "hallucination": None, "effective_share": None, "seconds": None}]
    for stage, ckpt, key in (("SFT", sft_ckpt, "SFT"), ("MPO", mpo_ckpt, "MPO"),
                             ("GRPO", grpo / "checkpoints" / "last.ckpt", "GRPO")):
        m = evaluate_module(load_module(str(ckpt)), val, batch_size=100, max_new_tokens=24)
        row = {"stage": stage, "accuracy": m["accuracy"], "format": m["format"], "hallucination": m["hallucination"],
               "accuracy_by_type": m["accuracy_by_type"], "effective_share": None, "seconds": times[key]}
        if stage == "GRPO":
            row.update(effective_shares(grpo / "logs"))
        results.append(row)
        print(f"  {stage}: accuracy {m['accuracy']:.3f}", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(str(out), out=str(out / "plots"), results=str(out / "results.json"))
    print("\n" + table(results))
    print(f"\nwhole demo: {time.perf_counter() - t_start:.0f}s; results: {out / 'results.json'}; "
          f"plots: {out / 'plots'}")
    return results


def _pct(v) -> str:
    return "-" if v is None or v != v else f"{100 * v:.1f}%"


def table(results: list[dict]) -> str:
    lines = ["| stage | held-out accuracy | format rate | hallucination rate | effective samples (GRPO) | time |",
             "|---|---|---|---|---|---|"]
    for r in results:
        eff = r.get("effective_share")
        if eff is not None and r.get("effective_share_before") is not None:
            eff_s = f"{_pct(eff)} (without buffer {_pct(r['effective_share_before'])})"
        else:
            eff_s = _pct(eff)
        secs = "-" if r.get("seconds") is None else f"{r['seconds']:.0f}s"
        lines.append(f"| {r['stage']} | {_pct(r['accuracy'])} | {_pct(r['format'])} | {_pct(r['hallucination'])} "
                     f"| {eff_s} | {secs} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
