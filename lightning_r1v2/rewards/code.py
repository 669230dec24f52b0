"""Code reward: run the completion's last Python block against the record's tests in the sandbox."""
from __future__ import annotations

import json
import re

from lightning_r1v2.rewards.sandbox import SandboxPool, default_pool

__all__ = ["code_reward", "extract_code"]

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


def _first(test: dict, *keys: str) -> str:
    for k in keys:
        if k in test and test[k] is not None:
            return test[k]
    return ""


def _normalize_output(s: str) -> str:
    return "\n".join(line.rstrip() for line in s.strip().splitlines())


def code_reward(
    completions: list[str],
    tests: list,
    all_or_nothing: bool = False,
    timeout: float = 5.0,
    memory_mb: int = 256,
    pool: SandboxPool | None = None,
    **kwargs,
) -> list[float | None]:
    """Share of a record's tests that the completion's last Python code block passes.

    ``tests`` holds, per row, a list of tests (or its JSON text). Each test is either
    ``{"input": str, "output": str}`` (``stdin``/``stdout`` are accepted too; the program reads ``input`` on stdin;
    passes when its stdout equals ``output`` after stripping surrounding whitespace and each
    line's trailing spaces) or ``{"assert": "assert f(2) == 4"}`` (the snippet is appended to the
    program; passes when the program exits 0). Every test is its own sandboxed process
    (:mod:`lightning_r1v2.rewards.sandbox`); all tests of the whole batch run on one pool.

    r_code(y) = (1/|T|) sum_{t in T} pass(y, t), or 1[all pass] with ``all_or_nothing``.
    No code block gives 0.0; ``tests`` None (or empty) gives None (not applicable).

    Example:
        >>> code_reward(["```python\\nprint(int(input()) * 2)\\n```"],
        ...             tests=[[{"input": "2", "output": "4"}, {"input": "3", "output": "7"}]])
        [0.5]
    """
    pool = pool or default_pool()
    out: list[float | None] = [None] * len(completions)
    jobs: list[dict] = []
    owners: list[tuple[int, str | None]] = []  # (row, expected stdout or None for assert tests)
    ran: list[int] = []  # rows with tests and a code block
    tests = [json.loads(t) if isinstance(t, str) else t for t in tests]  # datasets often store JSON text
    for i, (completion, row_tests) in enumerate(zip(completions, tests)):
        if not row_tests:
            continue
        code = extract_code(completion)
        if code is None:
            out[i] = 0.0
            continue
        out[i] = 0.0
        ran.append(i)
        for t in row_tests:
            if "assert" in t:
                jobs.append({"code": code + "\n\n" + t["assert"] + "\n", "stdin": ""})
                owners.append((i, None))
            else:
                jobs.append({"code": code, "stdin": str(_first(t, "input", "stdin"))})
                owners.append((i, str(_first(t, "output", "stdout", "expected_output"))))
    if jobs:
        results = pool.map(jobs, timeout=timeout, memory_mb=memory_mb)
        passed: dict[int, int] = {}
        for (i, expected), res in zip(owners, results):
            ok = res.ok and (expected is None or _normalize_output(res.stdout) == _normalize_output(expected))
            passed[i] = passed.get(i, 0) + int(ok)
        for i in ran:
            share = passed.get(i, 0) / len(tests[i])
            out[i] = float(share == 1.0) if all_or_nothing else share
    return out
