"""The notebooks run top to bottom, and what they print is right.

A failing cell fails the test. After the notebook's own cells, the test runs checks of its own in
the same kernel (the notebook files are not changed): each notebook's results are recomputed
from its objects, so a notebook that runs but reports wrong numbers fails too.
"""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

CHECKS = {
    # 64 records kept; 3 GRPO steps of 2 prompts x 4 samples; the plotted rewards are the logged
    # ones, and the last equals the mean combined reward (0.8 accuracy + 0.2 format) of the last batch
    "quickstart": """
from lightning_r1v2.rewards import accuracy_reward, format_reward
assert report.kept == 64 and report.total_skipped == 0
assert len(rollouts) == 8 and len(rollouts.completions) == 8 and rollouts.group_ids.tolist() == [0] * 4 + [1] * 4
assert trainer.global_step == 3 and list(steps) == [0, 1, 2], steps
last = module.last_rollouts
acc = accuracy_reward(last.completions, answer=[r['answer'] for r in last.records],
                      choices=[r.get('choices') for r in last.records])
fmt = format_reward(last.completions)
want = sum(0.8 * a + 0.2 * f for a, f in zip(acc, fmt)) / len(acc)
assert abs(rewards[-1] - want) < 1e-5, (rewards, want)
""",
    # the custom reward's logged mean is the mean of the function over the last batch
    "custom_reward": """
last = module.last_rollouts
vals = mentions_every_colour(last.completions, annotations=[r.get('annotations') for r in last.records])
assert None not in vals and len(vals) == 8
assert abs(mine.last_stats['rewards/colours/mean'] - sum(vals) / len(vals)) < 1e-6
assert mine.faults_total == 0
""",
}


def test_the_notebooks_exist():
    assert {p.stem for p in NOTEBOOKS} == set(CHECKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(CHECKS[path.stem]))
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
