"""The ``tests`` field of a code record: its two forms, parsed and checked when records are read.

``{"input": ..., "output": ...}`` (stdin/stdout) or ``{"assert": "assert f(2) == 4"}`` (a function
call compared with a literal). Parsing is pure (``ast``); running the program is the code reward's
job (``rewards/code.py``), which imports these types from here, below it in the layers.
"""
from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass

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
