"""Code reward: run the completion's last Python block against the record's tests in the sandbox.

The verdict is the trainer's, never the program's. A function test (``{"assert": "assert f(2) == 4"}``)
is parsed here into *checks*: the expression evaluated in the sandbox (``f(2)``), an operator and
the expected literal (``4``). Only the expression enters the sandbox; its value comes back as plain
data (:mod:`lightning_r1v2.rewards.sandbox`) and is compared here. A stdin/stdout test sends only
the input; the output is compared here. So a program that exits early, returns an object whose
``__eq__`` is always True, replaces ``sys.excepthook`` or reads its own source cannot pass.

Accepted assert forms (one or more ``assert`` statements per entry, joined by ``and`` too)::

    assert E == L    assert E != L    assert E < L  (<=, >, >=)    assert E in L    assert E not in L
    assert E is None / True / False   assert E is not None           assert E    assert not E
    assert abs(E - L) < T  (or <=)    assert math.isclose(E, L, rel_tol=..., abs_tol=...)

where ``L`` and ``T`` are Python literals and ``E`` is any expression without comparisons, boolean
operators, conditional expressions, arithmetic on a call's result, operator-module functions or
dunder attributes (those would let the program's objects decide the outcome inside the sandbox). Anything else is rejected when records are read
(:func:`parse_tests`, ``file:line: reason``).
"""
from __future__ import annotations

import re
import threading
import time

from lightning_r1v2.data.code_tests import FunctionTest, StdioTest, parse_test, parse_tests
from lightning_r1v2.rewards.faults import RewardFault
from lightning_r1v2.rewards.sandbox import SandboxPool, default_pool, run_program

__all__ = ["code_reward", "extract_code", "parse_tests", "parse_test"]

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[ \t]*\r?\n(.*?)```", re.DOTALL)
_PY_LANGS = {"", "python", "py", "python3", "py3"}
def extract_code(text: str) -> str | None:
    """The body of the last fenced block tagged ``python`` (or ``py``, ``python3``) or untagged.

    Example:
        >>> extract_code("```python\\nprint(1)\\n```\\nthen\\n```\\nprint(2)\\n```")
        'print(2)\\n'
    """
    if not isinstance(text, str):
        return None
    blocks = [m.group(2) for m in _FENCE.finditer(text) if m.group(1).lower() in _PY_LANGS]
    return blocks[-1] if blocks else None


def _normalize_output(s: str) -> str:
    return "\n".join(line.rstrip() for line in s.strip().splitlines())


class _Budget:
    """Wall-clock budgets: per row (summed over its processes) and for the whole batch."""

    def __init__(self, row_s: float, batch_s: float):
        self.row_s, self.deadline = row_s, time.monotonic() + batch_s
        self.batch_s = batch_s
        self.spent: dict[int, float] = {}
        self.over: dict[int, str] = {}
        self.lock = threading.Lock()

    def grant(self, row: int, timeout: float) -> tuple[float, str]:
        """Seconds this process may run (0: none left) and which budget bounds it, if not ``timeout``."""
        with self.lock:
            row_left = self.row_s - self.spent.get(row, 0.0)
            batch_left = self.deadline - time.monotonic()
        left = min(timeout, row_left, batch_left)
        which = "" if left >= timeout else ("row" if row_left <= batch_left else "batch")
        return max(left, 0.0), which

    def charge(self, row: int, seconds: float) -> None:
        with self.lock:
            self.spent[row] = self.spent.get(row, 0.0) + seconds

    def exceed(self, row: int, which: str) -> None:
        with self.lock:
            limit = f"row time budget {self.row_s:g}s" if which == "row" else f"batch time budget {self.batch_s:g}s"
            self.over.setdefault(row, f"{limit} exceeded; tests left unfinished")


def _run_one(budget: _Budget, row: int, timeout: float, kw: dict):
    """One sandboxed process under the budgets; None when a budget cut it short or left no time."""
    allowed, which = budget.grant(row, timeout)
    if allowed <= 0.05:
        budget.exceed(row, which or "row")
        return None
    res = run_program(timeout=allowed, cpu_seconds=int(timeout + 0.999) + 1, **kw)
    budget.charge(row, res.wall_s)
    if res.timed_out and which:
        budget.exceed(row, which)
    return res


def code_reward(
    completions: list[str],
    tests: list,
    all_or_nothing: bool = False,
    timeout: float = 5.0,
    memory_mb: int = 256,
    pool: SandboxPool | None = None,
    row_budget_s: float = 20.0,
    batch_budget_s: float = 300.0,
    **kwargs,
) -> list[float | None | RewardFault]:
    """Share of a record's tests that the completion's last Python code block passes.

    ``tests`` holds, per row, a list of tests (or its JSON text). Each test is either
    ``{"input": str, "output": str}`` (``stdin``/``stdout``/``expected_output`` are accepted too;
    passes when the program exits 0 and its stdout equals ``output`` after stripping surrounding
    whitespace and each line's trailing spaces; one sandboxed process per test) or
    ``{"assert": "assert f(2) == 4"}`` (see the module doc; all function tests of a row run in one
    process, which runs the program and then evaluates each check's expression). Verdicts are
    decided here, from plain data; expected values never enter the sandbox. All processes of the
    batch run on one pool.

    r_code(y) = (1/|T|) sum_{t in T} pass(y, t), or 1[all pass] with ``all_or_nothing``.
    No code block gives 0.0; ``tests`` None (or empty) gives None (not applicable).

    Faults (a :class:`RewardFault` for the row, counted by ``RewardCallback``, never a score): a
    malformed ``tests`` entry, and a row whose processes together ran past ``row_budget_s`` or
    that the batch did not reach within ``batch_budget_s`` (``timeout`` per process still applies;
    a program that hits it just fails that test).

    Example:
        >>> code_reward(["```python\\nprint(int(input()) * 2)\\n```"],
        ...             tests=[[{"input": "2", "output": "4"}, {"input": "3", "output": "7"}]])
        [0.5]
    """
    pool = pool or default_pool()
    out: list[float | None | RewardFault] = [None] * len(completions)
    budget = _Budget(row_budget_s, batch_budget_s)
    limits = {"memory_mb": memory_mb}
    futures: list[tuple[int, object, object]] = []  # (row, test or checks, future)
    parsed: dict[int, list] = {}
    for i, (completion, row_tests) in enumerate(zip(completions, tests)):
        if not row_tests:
            continue
        try:
            parsed[i] = parse_tests(row_tests)
        except ValueError as e:
            out[i] = RewardFault(f"malformed tests: {e}")
            continue
        if not parsed[i]:  # "[]" as JSON text: not applicable, like an empty list
            del parsed[i]
            continue
        code = extract_code(completion)
        out[i] = 0.0
        if code is None:
            parsed.pop(i)
            continue
        fn_tests = [t for t in parsed[i] if isinstance(t, FunctionTest)]
        if fn_tests:
            calls = [c.expr for t in fn_tests for c in t.checks]
            job = {"code": code, "stdin": "", "calls": calls, **limits}
            futures.append((i, fn_tests, pool.call(_run_one, budget, i, timeout, job)))
        for t in parsed[i]:
            if isinstance(t, StdioTest):
                job = {"code": code, "stdin": t.stdin, **limits}
                futures.append((i, t, pool.call(_run_one, budget, i, timeout, job)))
    passed: dict[int, int] = {}
    for i, what, fut in futures:
        res = fut.result()
        if res is None:
            continue
        if isinstance(what, StdioTest):
            ok = res.ok and _normalize_output(res.stdout) == _normalize_output(what.stdout)
            passed[i] = passed.get(i, 0) + int(ok)
            continue
        values = iter(res.values or [])
        for t in what:
            outcomes = [(c, next(values, ("missing", None))) for c in t.checks]
            ok = all(status == "ok" and c.passes(v) for c, (status, v) in outcomes)
            passed[i] = passed.get(i, 0) + int(ok)
    for i, row_tests in parsed.items():
        if i in budget.over:
            out[i] = RewardFault(budget.over[i])
            continue
        share = passed.get(i, 0) / len(row_tests)
        out[i] = float(share == 1.0) if all_or_nothing else share
    return out
