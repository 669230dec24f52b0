"""Throughput of the reward functions and of the sandbox (1 worker vs a pool, side by side).

Run: ``python benchmarks/rewards.py [--n 3000] [--programs 40] [--workers 0]`` (0: the default
pool size, ``min(8, cpu_count)``). Prints completions (or programs) per second. Not a test;
takes well under a minute on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import random
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000, help="synthetic completions for the rule rewards")
    ap.add_argument("--programs", type=int, default=40, help="programs for the sandbox comparison")
    ap.add_argument("--workers", type=int, default=0, help="pool size (0: min(8, cpu_count))")
    args = ap.parse_args()
    workers = args.workers or min(8, os.cpu_count() or 1)
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

    n_code = max(1, args.programs // 2)  # two tests each
    code = "```python\nn = int(input())\nprint(sum(i * i for i in range(n)))\n```"
    tests = [[{"input": "10", "output": "285"}, {"input": "4", "output": "14"}]] * n_code
    with SandboxPool(workers=workers) as pool:
        t = time.perf_counter()
        out = code_reward([code] * n_code, tests=tests, pool=pool)
        rate("code_reward (2 tests each)", n_code, time.perf_counter() - t)
        assert all(v == 1.0 for v in out), out

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
