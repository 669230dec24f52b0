"""A table of sample completions every N steps: ``completions.csv`` in the log folder, and a
Markdown table in TensorBoard. ``GRPOModule.configure_callbacks`` adds it (``table_every_n_steps``,
``table_rows``); it reads the step's batch from ``pl_module.last_rollouts``."""
from __future__ import annotations

import csv
from pathlib import Path

from lightning.pytorch import Callback


class CompletionsTable(Callback):
    """Write ``rows`` completions of the step's batch every ``every_n_steps`` optimizer steps (0: never)."""

    def __init__(self, every_n_steps: int = 50, rows: int = 8):
        self.every_n_steps = every_n_steps
        self.rows = rows

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        r = getattr(pl_module, "last_rollouts", None)
        if r is None or not self.every_n_steps or trainer.global_step % self.every_n_steps:
            return
        rows = min(self.rows, len(r))
        path = Path(trainer.log_dir or trainer.default_root_dir) / "completions.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        names = list(r.rewards)
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "id", "question", "answer", "completion", *names, "reward", "advantage"])
            for i in range(rows):
                rec = r.records[i]
                w.writerow([
                    trainer.global_step, rec.get("id"), rec.get("question"), rec.get("answer"), r.completions[i],
                    *[f"{float(r.rewards[k][i]):.3f}" for k in names],
                    f"{float(r.reward[i]):.3f}", f"{float(r.advantages[i]):.3f}",
                ])
        for logger in trainer.loggers:
            exp = getattr(logger, "experiment", None)
            if hasattr(exp, "add_text"):
                md = "\n".join(f"| {r.records[i].get('answer')} | `{r.completions[i]}` | {float(r.reward[i]):.2f} |"
                               for i in range(rows))
                exp.add_text("completions", "| answer | completion | reward |\n|---|---|---|\n" + md, trainer.global_step)
