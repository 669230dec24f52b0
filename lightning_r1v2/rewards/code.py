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

import ast
import json
import math
import re
import threading
import time
from dataclasses import dataclass

from lightning_r1v2.rewards.faults import RewardFault
from lightning_r1v2.rewards.sandbox import SandboxPool, default_pool, run_program

__all__ = ["code_reward", "extract_code", "parse_tests", "parse_test"]

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[ \t]*\r?\n(.*?)```", re.DOTALL)
_PY_LANGS = {"", "python", "py", "python3", "py3"}
_STDIN_KEYS = ("input", "stdin")
_STDOUT_KEYS = ("output", "stdout", "expected_output")
_OPS = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.In: "in", ast.NotIn: "not in"}
_FLIP = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
# Functions that compare or combine values (operator module and friends): inside the sandbox the
# program's objects would decide them.
_COMPARE_NAMES = {
    "eq", "ne", "lt", "le", "gt", "ge", "contains", "isclose", "all_equal", "add", "sub", "mul", "truediv",
    "floordiv", "mod", "pow", "matmul", "neg", "pos", "inv", "invert", "and_", "or_", "xor", "lshift", "rshift",
}


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


@dataclass(frozen=True)
class Check:
    """``op(value of expr in the sandbox, expected)``, decided in the trainer."""

    expr: str
    op: str
    expected: object = None
    tol: tuple[float, float] = (0.0, 0.0)
    """``(rel_tol, abs_tol)`` for ``isclose``; ``(0, T)`` for ``abs(E - L) < T`` (``absdiff<``, ``absdiff<=``)."""

    def passes(self, value) -> bool:
        """Whether a decoded plain value passes; a comparison that raises is a fail."""
        try:
            return bool(_compare(self.op, value, self.expected, self.tol))
        except Exception:  # noqa: BLE001 - e.g. '<' between str and int: the test fails
            return False


def _compare(op: str, v, e, tol) -> bool:
    if op == "==":
        return v == e
    if op == "!=":
        return v != e
    if op == "<":
        return v < e
    if op == "<=":
        return v <= e
    if op == ">":
        return v > e
    if op == ">=":
        return v >= e
    if op == "in":
        return v in e
    if op == "not in":
        return v not in e
    if op == "is":
        return v is e
    if op == "is not":
        return v is not e
    if op == "truthy":
        return bool(v)
    if op == "falsy":
        return not v
    if type(v) not in (int, float) or type(e) not in (int, float):
        return False
    if op == "isclose":
        return math.isclose(v, e, rel_tol=tol[0], abs_tol=tol[1])
    if op == "absdiff<":
        return abs(v - e) < tol[1]
    if op == "absdiff<=":
        return abs(v - e) <= tol[1]
    raise ValueError(op)


@dataclass(frozen=True)
class StdioTest:
    stdin: str
    stdout: str


@dataclass(frozen=True)
class FunctionTest:
    checks: tuple[Check, ...]


def _literal(node: ast.expr):
    try:
        return True, ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None


def _sandbox_expr(node: ast.expr) -> str:
    """The source of an expression the sandbox may evaluate; ValueError when it could hold a verdict."""
    for sub in ast.walk(node):
        if isinstance(sub, (ast.Compare, ast.BoolOp, ast.IfExp, ast.NamedExpr)):
            raise ValueError(f"the tested expression {ast.unparse(node)!r} contains a comparison or condition; "
                             "put the comparison at the top of the assert (assert f(x) == literal)")
        if isinstance(sub, (ast.BinOp, ast.UnaryOp)) and any(isinstance(n, ast.Call) for n in ast.walk(sub)):
            # f(2) - 4 == 0: an object returned by f could answer '- 4' with 0 without knowing f(2)
            raise ValueError(f"the tested expression {ast.unparse(node)!r} does arithmetic on a call's result; "
                             "compare the result itself (or use abs(E - L) < T / math.isclose)")
        name = sub.attr if isinstance(sub, ast.Attribute) else sub.id if isinstance(sub, ast.Name) else None
        if name is not None and (name.startswith("__") or name in _COMPARE_NAMES):
            raise ValueError(f"the tested expression {ast.unparse(node)!r} uses {name!r}, which could decide "
                             "the outcome inside the sandbox")
    return ast.unparse(node)


def _checks(node: ast.expr) -> list[Check]:
    if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.And):
        return [c for v in node.values for c in _checks(v)]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return [Check(_sandbox_expr(node.operand), "falsy")]
    if isinstance(node, ast.Call) and _is_isclose(node.func):
        if len(node.args) != 2:
            raise ValueError("math.isclose needs two positional arguments")
        lit_ok, expected = _literal(node.args[1])
        if not lit_ok:
            raise ValueError("the second argument of math.isclose must be a literal")
        tol = {"rel_tol": 1e-9, "abs_tol": 0.0}
        for kw in node.keywords:
            ok, val = _literal(kw.value)
            if kw.arg not in tol or not ok or type(val) not in (int, float):
                raise ValueError(f"math.isclose keyword {kw.arg!r} must be rel_tol or abs_tol with a number")
            tol[kw.arg] = float(val)
        return [Check(_sandbox_expr(node.args[0]), "isclose", expected, (tol["rel_tol"], tol["abs_tol"]))]
    if isinstance(node, ast.Compare):
        if len(node.ops) != 1:
            raise ValueError("chained comparisons are not supported; write one comparison per assert")
        left, op, right = node.left, node.ops[0], node.comparators[0]
        if isinstance(op, (ast.Is, ast.IsNot)):
            if not (isinstance(right, ast.Constant) and right.value in (None, True, False)):
                raise ValueError("'is' tests only against None, True or False")
            return [Check(_sandbox_expr(left), "is" if isinstance(op, ast.Is) else "is not", right.value)]
        sym = _OPS.get(type(op))
        if sym is None:
            raise ValueError(f"unsupported comparison {type(op).__name__}")
        absdiff = _absdiff(left) if sym in ("<", "<=") else None
        if absdiff is not None:
            ok, tol = _literal(right)
            if not ok or type(tol) not in (int, float):
                raise ValueError("the tolerance T in abs(E - L) < T must be a number literal")
            expr, expected = absdiff
            return [Check(expr, "absdiff" + sym, expected, (0.0, float(tol)))]
        l_lit, l_val = _literal(left)
        r_lit, r_val = _literal(right)
        if l_lit and r_lit:
            raise ValueError("the assert compares two literals; it tests nothing")
        if r_lit:
            return [Check(_sandbox_expr(left), sym, r_val)]
        if l_lit and sym in _FLIP:
            return [Check(_sandbox_expr(right), _FLIP[sym], l_val)]
        raise ValueError("one side of the comparison must be a Python literal (the expected value)")
    return [Check(_sandbox_expr(node), "truthy")]


def _is_isclose(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "isclose") or (isinstance(func, ast.Name) and func.id == "isclose")


def _absdiff(node: ast.expr) -> tuple[str, object] | None:
    """``abs(E - L)`` or ``abs(L - E)`` -> ``(source of E, L)``."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "abs"):
        return None
    if len(node.args) != 1 or node.keywords or not isinstance(node.args[0], ast.BinOp) or not isinstance(node.args[0].op, ast.Sub):
        return None
    a, b = node.args[0].left, node.args[0].right
    for expr, lit in ((a, b), (b, a)):
        ok, val = _literal(lit)
        if ok and type(val) in (int, float):
            return _sandbox_expr(expr), val
    raise ValueError("in abs(E - L) < T, L must be a number literal")


def parse_test(test) -> StdioTest | FunctionTest:
    """One ``tests`` entry -> a test; ``ValueError`` with the reason when malformed.

    Example:
        >>> parse_test({"assert": "assert f(2) == 4"}).checks[0]
        Check(expr='f(2)', op='==', expected=4, tol=(0.0, 0.0))
    """
    if not isinstance(test, dict):
        raise ValueError(f"a test must be an object, got {type(test).__name__}")
    keys = set(test)
    if "assert" in test:
        if keys != {"assert"}:
            raise ValueError(f"an assert test has only the key 'assert', got also {sorted(keys - {'assert'})}")
        src = test["assert"]
        if not isinstance(src, str) or not src.strip():
            raise ValueError("'assert' must be a non-empty string")
        try:
            tree = ast.parse(src, mode="exec")
        except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
            raise ValueError(f"'assert' is not valid Python ({type(e).__name__}: {e})") from None
        if not tree.body or not all(isinstance(s, ast.Assert) for s in tree.body):
            raise ValueError("'assert' may hold only assert statements")
        return FunctionTest(tuple(c for s in tree.body for c in _checks(s.test)))
    unknown = keys - set(_STDIN_KEYS) - set(_STDOUT_KEYS)
    if unknown:
        raise ValueError(
            f"unknown test key(s) {sorted(unknown)}; a test is {{'input', 'output'}} (or stdin/stdout, "
            "expected_output) or {'assert'}"
        )
    ins = [k for k in _STDIN_KEYS if k in test]
    outs = [k for k in _STDOUT_KEYS if k in test]
    if len(ins) > 1 or len(outs) > 1:
        raise ValueError(f"a test names its input or output twice ({ins + outs})")
    if not outs or test[outs[0]] is None:
        raise ValueError("a stdin/stdout test needs 'output' (the expected stdout)")
    values = [test[k] for k in ins + outs if test[k] is not None]
    if not all(isinstance(v, str) or (type(v) in (int, float)) for v in values):
        raise ValueError("'input' and 'output' must be strings (or numbers)")
    stdin = test[ins[0]] if ins and test[ins[0]] is not None else ""
    return StdioTest(str(stdin), str(test[outs[0]]))


def parse_tests(tests) -> list[StdioTest | FunctionTest]:
    """A record's ``tests`` (list, or its JSON text) -> tests; ``ValueError("tests[i]: reason")``."""
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"'tests' is text but not JSON ({type(e).__name__})") from None
    if not isinstance(tests, list):
        raise ValueError(f"'tests' must be a list, got {type(tests).__name__}")
    out = []
    for i, t in enumerate(tests):
        try:
            out.append(parse_test(t))
        except ValueError as e:
            raise ValueError(f"tests[{i}]: {e}") from None
    return out


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
