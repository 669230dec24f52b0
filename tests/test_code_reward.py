"""code_reward: parsing and validating tests, verdicts decided in the trainer, time budgets as faults."""
import pytest

from lightning_r1v2.rewards import SandboxPool, code_reward
from lightning_r1v2.data.code_tests import Check, FunctionTest, StdioTest, parse_test, parse_tests
from lightning_r1v2.rewards.faults import RewardFault


def block(code):
    return f"```python\n{code}\n```"


@pytest.mark.parametrize(
    "src, checks",
    [
        ("assert f(2) == 4", [Check("f(2)", "==", 4)]),
        ("assert 4 == f(2)", [Check("f(2)", "==", 4)]),
        ("assert 3 < f(2)", [Check("f(2)", ">", 3)]),  # flipped so the sandboxed side is on the left
        ("assert f(2) in (4, 5)", [Check("f(2)", "in", (4, 5))]),
        ("assert f(1) is None", [Check("f(1)", "is", None)]),
        ("assert not g([])", [Check("g([])", "falsy")]),
        ("assert g([1])", [Check("g([1])", "truthy")]),
        ("assert f(-2 + 1) == 1", [Check("f(-2 + 1)", "==", 1)]),  # arithmetic on inputs is fine
        ("assert f(2) == 4 and f(3) == 9\nassert f(0) == 0", [Check("f(2)", "==", 4), Check("f(3)", "==", 9), Check("f(0)", "==", 0)]),
        ("assert abs(h(2) - 1.5) < 1e-6", [Check("h(2)", "absdiff<", 1.5, (0.0, 1e-6))]),
        ("assert math.isclose(h(2), 1.5, rel_tol=1e-3)", [Check("h(2)", "isclose", 1.5, (1e-3, 0.0))]),
    ],
)
def test_assert_forms_become_checks_with_the_expected_value_kept_outside(src, checks):
    assert parse_test({"assert": src}) == FunctionTest(tuple(checks))


@pytest.mark.parametrize(
    "test, reason",
    [
        ({"input": "2", "expected": "4"}, "unknown test key(s) ['expected']"),
        ({"input": "2"}, "needs 'output'"),
        ({"input": "2", "output": None}, "needs 'output'"),
        ({"input": "2", "output": ["4"]}, "must be strings"),
        ({"input": "1", "stdin": "1", "output": "1"}, "names its input or output twice"),
        ({"assert": "assert f(2) == 4", "output": "4"}, "only the key 'assert'"),
        ({"assert": "print(f(2))"}, "only assert statements"),
        ({"assert": "assert f(2) =="}, "not valid Python"),
        ({"assert": "assert f(2) == g(2)"}, "must be a Python literal"),
        ({"assert": "assert (f(2) == 4) == True"}, "contains a comparison"),
        ({"assert": "assert all(f(x) == x * x for x in range(3))"}, "contains a comparison"),
        ({"assert": "assert f(2).__eq__(4)"}, "uses '__eq__'"),
        ({"assert": "assert operator.eq(f(2), 4)"}, "uses 'eq'"),
        ({"assert": "assert f(2) - 4 == 0"}, "arithmetic on a call's result"),
        ({"assert": "assert round(-f(2), 3) == -4"}, "arithmetic on a call's result"),
        ({"assert": "assert operator.sub(f(2), 4) == 0"}, "uses 'sub'"),
        ({"assert": "assert 1 < f(2) < 3"}, "chained comparisons"),
        ({"assert": "assert 2 == 2"}, "compares two literals"),
        ({"assert": "assert f(2) is 4"}, "only against None"),
        ("assert f(2) == 4", "must be an object"),
    ],
)
def test_malformed_tests_are_errors_with_the_reason(test, reason):
    with pytest.raises(ValueError) as err:
        parse_tests([{"input": "1", "output": "1"}, test])
    assert str(err.value).startswith("tests[1]: ") and reason in str(err.value)


def test_stdio_aliases_and_json_text():
    assert parse_tests('[{"stdin": "4", "stdout": "8"}, {"output": 3}]') == [StdioTest("4", "8"), StdioTest("", "3")]
    with pytest.raises(ValueError, match="not JSON"):
        parse_tests("[{")


def test_checks_compare_plain_data_with_python_semantics():
    assert Check("e", "==", 4).passes(4.0) and not Check("e", "==", (1, 2)).passes([1, 2])
    assert not Check("e", "<", 3).passes("a")  # TypeError in the comparison is a fail
    # abs(E - 1.5) < 1e-6: 1.5000001 is within, 1.5001 is not; a string is not a number
    c = Check("e", "absdiff<", 1.5, (0.0, 1e-6))
    assert c.passes(1.5000001) and not c.passes(1.5001) and not c.passes("1.5")
    assert Check("e", "is", True).passes(True) and not Check("e", "is", True).passes(1)


def test_empty_tests_in_any_form_are_not_applicable():
    assert code_reward([block("print(1)")] * 4, tests=[None, [], "[]", ""]) == [None] * 4


def test_malformed_row_is_a_fault_not_a_pass():
    square = block("def f(x):\n    return x * x")
    out = code_reward([square, square], tests=[[{"input": "2", "expected": "4"}], [{"assert": "assert f(3) == 9"}]])
    assert isinstance(out[0], RewardFault) and "tests[0]: unknown test key(s) ['expected']" in out[0]
    assert out[1] == 1.0


def test_function_tests_share_one_process_and_give_partial_credit():
    prog = block("def f(x):\n    return x * x if x < 3 else 0")
    tests = [{"assert": "assert f(2) == 4"}, {"assert": "assert f(3) == 9"}, {"assert": "assert f(1) == 1 and f(0) == 0"},
             {"input": "", "output": ""}]
    # f(3) fails; the stdin/stdout test (empty output) passes: 3 of 4
    assert code_reward([prog], tests=[tests]) == [0.75]


def test_row_time_budget_is_a_fault():
    loop = block("while True:\n    pass")
    three = [{"input": str(i), "output": "x"} for i in range(3)]
    with SandboxPool(workers=1) as pool:
        out = code_reward([loop], tests=[three], timeout=0.6, row_budget_s=1.0, pool=pool)
    # the first test times out at 0.6 s (a fail), the second gets the 0.4 s left and is cut: a fault
    assert isinstance(out[0], RewardFault) and out[0] == "row time budget 1s exceeded; tests left unfinished"


def test_batch_time_budget_is_a_fault_for_rows_not_finished():
    right = block("print(int(input()) * 2)")
    loop = block("while True:\n    pass")
    tests = [[{"input": "2", "output": "4"}]] + [[{"input": "1", "output": "x"}]] * 3
    with SandboxPool(workers=1) as pool:
        out = code_reward([right, loop, loop, loop], tests=tests, timeout=5.0, batch_budget_s=1.0, pool=pool)
    assert out[0] == 1.0
    assert all(isinstance(v, RewardFault) and v == "batch time budget 1s exceeded; tests left unfinished" for v in out[1:])
