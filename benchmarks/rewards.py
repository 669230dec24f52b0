"""Throughput of the reward functions and of the sandbox (1 worker vs a pool, side by side).

Run: ``python benchmarks/rewards.py [--n 3000] [--programs 40] [--workers 0] [--before REV]``
(0: the default pool size, ``min(8, cpu_count)``). Prints completions (or programs) per second.
Not a test; takes about a minute on 2 cores.

Code reward before/after: the same batch (rows with 2 stdin/stdout tests and 3 assert tests)
is scored by this tree and by the package as it was at ``--before`` (default ``dc0dbb5``, the
commit before issue 17: asserts appended to the program, one process per test, no bubblewrap),
exported with ``git archive`` into a temporary folder and run in a subprocess in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import time

from lightning_r1v2.rewards import SandboxPool, accuracy_reward, code_reward, format_reward
from lightning_r1v2.rewards.sandbox import _runtime

COLOURS = ("red", "green", "blue", "yellow")


def synthetic_batch(n: int, seed: int = 0) -> tuple[list[str], list[str], list]:
    """Completions in the synthetic task's style, about half right, with 20% fraction answers."""
    rng = random.Random(seed)
    comps, answers, choices = [], [], []
    for _ in range(n):
        counts = {c: rng.randint(0, 5) for c in COLOURS}
        think = "<think> " + " ".join(f"{c} {k}" for c, k in counts.items()) + " </think> "
        right = rng.random() < 0.5
        kind = rng.random()
        opts = None
        if kind < 0.3:  # count
            gold = str(counts["red"])
            pred = gold if right else str(int(gold) + 1)
        elif kind < 0.45:  # most frequent colour
            gold = rng.choice(COLOURS)
            pred = gold.capitalize() if right else rng.choice([c for c in COLOURS if c != gold])
        elif kind < 0.6:  # compare
            gold = rng.choice(("yes", "no"))
            pred = gold if right else ("no" if gold == "yes" else "yes")
        elif kind < 0.8:  # multiple choice
            opts = ["1", "2", "3", "4"]
            gold = rng.choice("ABCD")
            pred = f"({gold})" if right else rng.choice([x for x in "ABCD" if x != gold])
        else:  # fractions: math-verify
            a, b = rng.randint(1, 9), rng.randint(2, 12)
            gold = f"{a}/{b}"
            pred = rng.choice([f"\\frac{{{a}}}{{{b}}}", f"\\frac{{{2 * a}}}{{{2 * b}}}", f"{a / b:.6f}"])
            if not right:
                pred = f"\\frac{{{a + 1}}}{{{b}}}"
        if rng.random() < 0.1:
            comps.append(f"the answer is {pred}")  # broken format, no box
        else:
            comps.append(think + f"\\boxed{{{pred}}}")
        answers.append(gold)
        choices.append(opts)
    return comps, answers, choices


def rate(label: str, count: int, seconds: float, unit: str = "completions") -> None:
    print(f"{label:<34} {count:>6} {unit:<11} {seconds:7.3f} s  {count / seconds:10.1f} /s")


CODE_ROW = (
    "```python\ndef f(x):\n    return x * x\n\nif __name__ == '__main__':\n    import sys\n"
    "    data = sys.stdin.read().split()\n    if data:\n        print(f(int(data[0])))\n```"
)
CODE_TESTS = [
    {"input": "3", "output": "9"}, {"input": "12", "output": "144"},
    {"assert": "assert f(2) == 4"}, {"assert": "assert f(5) == 25"}, {"assert": "assert f(0) == 0"},
]


def code_throughput(rows: int, workers: int) -> dict:
    """Score ``rows`` copies of a right program on 5 tests each; every score must be 1.0."""
    from lightning_r1v2.rewards.sandbox import _runtime

    t = time.perf_counter()
    rt = _runtime()
    probe = time.perf_counter() - t
    with SandboxPool(workers=workers) as pool:
        t = time.perf_counter()
        out = code_reward([CODE_ROW] * rows, tests=[CODE_TESTS] * rows, pool=pool)
        seconds = time.perf_counter() - t
    assert all(v == 1.0 for v in out), out
    return {"rows": rows, "seconds": seconds, "probe_s": probe, "mode": getattr(rt, "bwrap", None) and "bwrap" or "legacy"}


def code_before(rev: str, rows: int, workers: int) -> dict | None:
    """``code_throughput`` on the package as of ``rev`` (git archive, subprocess)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        archive = os.path.join(tmp, "old.tar")
        got = subprocess.run(["git", "-C", root, "archive", "-o", archive, rev, "lightning_r1v2"], capture_output=True, text=True)
        if got.returncode != 0:
            print(f"  (before: cannot export {rev}: {got.stderr.strip()})")
            return None
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        return code_in_subprocess(tmp, rows, workers)


def code_in_subprocess(pythonpath: str, rows: int, workers: int, **env) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--code-only", str(rows), "--workers", str(workers)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": pythonpath, **env}, cwd=pythonpath)
    if res.returncode != 0:
        print(f"  (run failed: {res.stderr.strip()[-300:]})")
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000, help="synthetic completions for the rule rewards")
    ap.add_argument("--programs", type=int, default=40, help="programs for the sandbox comparison")
    ap.add_argument("--workers", type=int, default=0, help="pool size (0: min(8, cpu_count))")
    ap.add_argument("--code-rows", type=int, default=24, help="rows (5 tests each) for the code-reward before/after")
    ap.add_argument("--before", default="dc0dbb5", help="git revision measured as 'before' for the code reward")
    ap.add_argument("--code-only", type=int, default=0, help=argparse.SUPPRESS)  # internal: one measurement as JSON
    args = ap.parse_args()
    workers = args.workers or min(8, os.cpu_count() or 1)
    if args.code_only:
        print(json.dumps(code_throughput(args.code_only, workers)))
        return
    print(f"cpus={os.cpu_count()} pool workers={workers}")

    comps, answers, choices = synthetic_batch(args.n)
    t = time.perf_counter()
    fmt = format_reward(comps)
    rate("format_reward", len(comps), time.perf_counter() - t)
    t = time.perf_counter()
    acc = accuracy_reward(comps, answer=answers, choices=choices)
    rate("accuracy_reward (cold parse cache)", len(comps), time.perf_counter() - t)
    t = time.perf_counter()
    accuracy_reward(comps, answer=answers, choices=choices)
    rate("accuracy_reward (warm parse cache)", len(comps), time.perf_counter() - t)
    print(f"  mean format {sum(fmt) / len(fmt):.3f}, mean accuracy {sum(acc) / len(acc):.3f}")

    t = time.perf_counter()
    rt = _runtime()
    print(f"sandbox runtime probe {time.perf_counter() - t:.3f} s: {rt}")

    after = code_throughput(args.code_rows, workers)
    before = code_before(args.before, args.code_rows, workers)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    legacy = code_in_subprocess(root, args.code_rows, workers, R1V2_SANDBOX="legacy")
    print(f"code_reward, {args.code_rows} rows x 5 tests (2 stdin/stdout, 3 assert), {workers} workers:")
    print(f"  {'':<28} {'rows/s':>8} {'s':>7}  sandbox")
    rows = ((f"before ({args.before})", before), ("after (this tree)", after), ("after, R1V2_SANDBOX=legacy", legacy))
    for label, m in rows:
        if m is not None:
            print(f"  {label:<28} {m['rows'] / m['seconds']:8.1f} {m['seconds']:7.2f}  {m['mode']} (probe {m['probe_s']:.2f} s)")

    programs = [(f"import sys\nprint(sum(range({i} * 1000)))", "") for i in range(args.programs)]
    timings = {}
    for w in (1, workers):
        with SandboxPool(workers=w) as pool:
            t = time.perf_counter()
            results = pool.map(programs)
            timings[w] = time.perf_counter() - t
        assert all(r.ok for r in results)
        rate(f"sandbox, {w} worker(s)", len(programs), timings[w], unit="programs")
    print(f"pool speed-up ({workers} workers vs 1): {timings[1] / timings[workers]:.2f}x")


if __name__ == "__main__":
    main()
