"""No file in ``lightning_r1v2/`` imports a module from a higher layer than its own.

Layers, bottom to top: losses, models, utils; data; rollout; rewards; callbacks; modules; jobs;
then the entry points (strategies, demo, study). Imports inside functions count too.
"""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lightning_r1v2"
LAYERS = {"losses": 0, "models": 0, "utils": 0, "data": 1, "rollout": 2, "rewards": 3, "callbacks": 4,
          "modules": 5, "jobs": 6}
TOP = 7  # strategies.py, demo.py, study.py and anything else at the package root


def _layer(parts: tuple[str, ...]) -> int:
    return LAYERS.get(parts[0], TOP) if parts else TOP


def _imports(path: Path):
    """``(line, imported package path parts)`` of every lightning_r1v2 import in ``path``."""
    here = path.relative_to(PKG).with_suffix("").parts  # e.g. ('rollout', 'hf_engine')
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from ..x import y
                base = here[: len(here) - node.level]
                mod = tuple(base) + tuple((node.module or "").split(".")) if node.module else tuple(base)
                names = [mod + (a.name,) for a in node.names] if not node.module else [mod]
            elif node.module and node.module.startswith("lightning_r1v2"):
                names = [tuple(node.module.split(".")[1:])]
            else:
                continue
            for parts in names:
                yield node.lineno, tuple(p for p in parts if p)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("lightning_r1v2."):
                    yield node.lineno, tuple(a.name.split(".")[1:])


def violations() -> list[str]:
    out = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("").parts
        mine = _layer(rel[:-1]) if len(rel) > 1 else TOP
        for line, parts in _imports(path):
            if _layer(parts) > mine:
                out.append(f"lightning_r1v2/{'/'.join(rel)}.py:{line}: imports {'.'.join(parts)} "
                           f"(layer {_layer(parts)} above {mine})")
    return out


def test_no_module_imports_from_a_higher_layer():
    assert not violations(), "\n".join(violations())


def test_the_check_sees_relative_and_absolute_and_local_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "lightning_r1v2"
    (pkg / "rewards").mkdir(parents=True)
    (pkg / "rewards" / "x.py").write_text(
        "from ..callbacks import hallucination\n"
        "from lightning_r1v2.modules.grpo import GRPOModule\n"
        "def f():\n    from ..losses import grpo\n    import lightning_r1v2.jobs.export\n")
    monkeypatch.setattr(__import__(__name__), "PKG", pkg)
    got = violations()
    assert [g.split(":")[1] for g in got] == ["1", "2", "5"] and "imports callbacks" in got[0]
